"""The trio driver of the gossip core: a UDP socket, a ticker, TCP push-pull.

Usage (a broker controller that wants "tell me when a node dies or joins")::

    node = GossipNode(node_id=NodeId(1), host="0.0.0.0", port=9500,
                      seeds=["10.0.0.2:9501"], metadata={"rpc": "10.0.0.1:9400"})
    port = await nursery.start(node.run)          # bound UDP port (port 0 allowed)
    async with node.subscribe() as events:        # subscribe first ...
        reconcile(node.members())                 # ... then read the whole view
        async for event in events:                # ... then follow the changes
            match event:
                case MemberDead(member=m): fence(m.node_id)
                case MemberJoined(member=m): ...

``members()`` is the level (the whole view, this node included); ``subscribe()`` is
the edge (events in order). A subscriber that falls ``max_buffer`` events behind is
dropped: its channel ends, and it should read ``members()`` and subscribe again. The
channel also ends when the node stops.

Ownership: :meth:`GossipNode.run` opens its own nursery, which owns the UDP socket,
the loop task, the TCP push-pull listener (:class:`~dlog.net.server.RpcServer` on the
TCP port with the same number as the UDP port) and the RPC pool for outgoing
push-pulls. Cancelling ``run`` stops everything without a word (the others will
declare this node dead); :meth:`GossipNode.leave` announces the leave, waits
(bounded) until it has been gossiped, then makes ``run`` return.

One task runs the core: it waits until the socket is readable or the next tick is
due, reads every datagram waiting, then runs the ticks that are due, then sends.
Reading before ticking matters on a busy machine: after a scheduling stall, acks that
arrived during the stall are counted before the probe deadlines they beat are
checked, so a starved node does not accuse peers that answered in time.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import random
import socket
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from dlog.errors import DlogError, NetworkError
from dlog.gossip.config import GossipConfig
from dlog.gossip.core import GossipCore, GossipStats, validate_metadata
from dlog.gossip.events import Member, MemberEvent
from dlog.gossip.messages import Address
from dlog.net.address import format_address, parse_address
from dlog.net.client import ClientConfig, RpcPool, open_rpc_pool
from dlog.net.messages import Message, payload_bytes, register
from dlog.net.server import Route, RpcServer
from dlog.types import NodeId

log = logging.getLogger(__name__)

#: Ticks run at once after a stall, at most (the rest of a long stall is skipped).
_MAX_CATCH_UP_TICKS = 1000
#: Datagrams read per wake-up before ticking and sending.
_MAX_READ_BATCH = 512
_PUSH_PULL_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class GossipPushPullRequest(Message):
    """Push-pull over TCP: the payload is the sender's full state (encode_state)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GossipPushPullResponse(Message):
    """The receiver's full state, after merging the sender's."""


register("gossip_push_pull", GossipPushPullRequest, GossipPushPullResponse)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class GossipNode:
    """One node's gossip membership over UDP (see the module docstring)."""

    def __init__(
        self,
        *,
        node_id: NodeId,
        host: str = "127.0.0.1",
        port: int = 0,
        seeds: Iterable[str | Address] = (),
        metadata: Mapping[str, str] | None = None,
        config: GossipConfig | None = None,
        advertise_host: str | None = None,
        advertise_port: int | None = None,
        push_pull_over_tcp: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        """``host:port`` is the UDP bind address (port 0: any free port, reported by
        ``run``); ``advertise_host/port`` (default: the bound address) are what other
        members are told. ``seeds`` are ``host:port`` strings or tuples of other
        members' gossip addresses. ``metadata`` is opaque to gossip (rpc address, raft
        address, role, version, ...): a small ``str -> str`` map. With
        ``push_pull_over_tcp`` (default) periodic full-state syncs use TCP on the port
        with the UDP port's number, otherwise UDP.
        """
        self.config = config or GossipConfig()
        self.node_id = node_id
        self._host = host
        self._port = port
        self._seeds = [parse_address(s) if isinstance(s, str) else s for s in seeds]
        self._metadata = validate_metadata(metadata or {}, self.config.max_metadata_bytes)
        self._advertise_host = advertise_host
        self._advertise_port = advertise_port
        self._tcp = push_pull_over_tcp
        self._rng = rng or random.Random()
        self._core: GossipCore | None = None
        self._socket: socket.socket | None = None
        self._subscribers: list[trio.MemorySendChannel[MemberEvent]] = []
        self._resolved: dict[str, str | None] = {}
        self._nursery: trio.Nursery | None = None
        self._pool: RpcPool | None = None
        self._leave_done = trio.Event()
        self._wait_scope: trio.CancelScope | None = None
        #: Times the driver loop woke (a datagram, a due timer, a poke): diagnostics.
        self.loop_wakeups = 0
        self.send_errors = 0
        #: Test hook: while set, every datagram in or out is dropped and no push-pull
        #: starts, as if this node's network were cut.
        self.isolated = False

    # -- what other components use -------------------------------------------------------

    @property
    def address(self) -> Address | None:
        """The advertised gossip address, once ``run`` has bound its socket."""
        return None if self._core is None else self._core.address

    @property
    def incarnation(self) -> int:
        return 0 if self._core is None else self._core.incarnation

    @property
    def stats(self) -> GossipStats:
        return GossipStats() if self._core is None else self._core.stats

    @property
    def health_score(self) -> int:
        return 0 if self._core is None else self._core.health_score

    def members(self) -> list[Member]:
        """The current view, this node included, by node id ([] before ``run`` starts)."""
        return [] if self._core is None else self._core.members()

    def member(self, node_id: NodeId) -> Member | None:
        return None if self._core is None else self._core.member(node_id)

    @asynccontextmanager
    async def subscribe(
        self, max_buffer: int = 1024
    ) -> AsyncIterator[trio.MemoryReceiveChannel[MemberEvent]]:
        """Membership events from now on, in order, until the block exits.

        The channel ends if this subscriber falls ``max_buffer`` events behind (then
        read ``members()`` and subscribe again) or when the node stops.
        """
        send, receive = trio.open_memory_channel[MemberEvent](max_buffer)
        self._subscribers.append(send)
        try:
            async with receive:
                yield receive
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            send.close()

    def update_metadata(self, metadata: Mapping[str, str]) -> None:
        """Publish new metadata; it reaches every member within a few gossip rounds."""
        self._metadata = validate_metadata(metadata, self.config.max_metadata_bytes)
        if self._core is not None:
            self._core.update_metadata(self._metadata)
            self._flush()
            self._poke()

    async def leave(self, timeout_s: float = 1.0) -> None:
        """Leave gracefully: announce it, wait until it was gossiped (at most
        ``timeout_s``), then stop ``run``. Without a running node, nothing to do."""
        core = self._core
        if core is None or self._nursery is None:
            return
        core.leave()
        self._flush()
        self._poke()
        with trio.move_on_after(timeout_s):
            await self._leave_done.wait()
        self._nursery.cancel_scope.cancel()

    # -- running -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, join through the seeds and run until cancelled or :meth:`leave`.

        ``task_status.started(bound_udp_port)``. Cancellation closes the socket and
        the TCP listener; nothing is sent on the way out.
        """
        for attempt in range(20):
            sock = await self._bind_udp()
            bound_port: int = sock.getsockname()[1]
            try:
                async with trio.open_nursery() as nursery:
                    if self._tcp:
                        server = RpcServer(
                            {"gossip_push_pull": Route(self._on_push_pull, inline=True)},
                            name="gossip",
                        )
                        try:
                            await nursery.start(server.run, self._host, bound_port)
                        except OSError:
                            if self._port != 0 or attempt == 19:
                                raise
                            # The ephemeral UDP port's TCP twin is taken: pick another.
                            log.debug("gossip TCP port %d busy; rebinding", bound_port)
                            nursery.cancel_scope.cancel()
                            continue
                    await self._serve(nursery, sock, bound_port, task_status)
                return
            finally:
                sock.close()
                self._socket = None

    async def _bind_udp(self) -> socket.socket:
        infos = await trio.socket.getaddrinfo(self._host, self._port, type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        # A stdlib socket, non-blocking, wrapped by trio for bind: the loop reads it in
        # batches without a scheduler round trip per datagram.
        raw = socket.socket(family, socket.SOCK_DGRAM)
        try:
            tsock = trio.socket.from_stdlib_socket(raw)
            await tsock.bind(sockaddr)
        except OSError as exc:
            raw.close()
            raise OSError(
                exc.errno, f"gossip cannot bind UDP {self._host}:{self._port}: {exc.strerror}"
            ) from exc
        except BaseException:
            raw.close()
            raise
        return raw

    async def _serve(
        self,
        nursery: trio.Nursery,
        sock: socket.socket,
        bound_port: int,
        task_status: trio.TaskStatus[int],
    ) -> None:
        advertise = (
            self._advertise_host or sock.getsockname()[0],
            self._advertise_port or bound_port,
        )
        if advertise[0] in ("0.0.0.0", "::"):
            # Bound to every interface: advertise the address the host name resolves to.
            infos = await trio.socket.getaddrinfo(socket.gethostname(), None, family=sock.family)
            advertise = (str(infos[0][4][0]), advertise[1])
        self._socket = sock
        self._core = GossipCore(
            node_id=self.node_id,
            address=advertise,
            rng=random.Random(self._rng.getrandbits(64)),
            metadata=self._metadata,
            seeds=self._seeds,
            config=self.config,
            incarnation=0,
            stream_push_pull=self._tcp,
        )
        self._nursery = nursery
        self._leave_done = trio.Event()
        try:
            async with open_rpc_pool(
                ClientConfig(
                    connect_timeout_s=_PUSH_PULL_TIMEOUT_S,
                    request_timeout_s=_PUSH_PULL_TIMEOUT_S,
                )
            ) as pool:
                self._pool = pool
                log.info("gossip node %d on %s:%d", self.node_id, *advertise)
                task_status.started(bound_port)
                await self._loop(sock)
        finally:
            self._pool = None
            for channel in self._subscribers:
                channel.close()
            self._subscribers.clear()
            nursery.cancel_scope.cancel()

    async def _loop(self, sock: socket.socket) -> None:
        """Ticks stay on a fixed grid of ``tick_ms``, but the loop wakes only for a
        datagram, for the tick at which the core's next timer is due, or when another
        task handed the core something (:meth:`_poke`): an idle node is not woken 100
        times a second. Ticks that passed are ticked before a datagram is handed over,
        so the core's clock is never more than one tick behind."""
        core = self._core
        assert core is not None
        tick_s = self.config.tick_ms / 1000
        next_tick = trio.current_time() + tick_s  # when core.now + 1 is due
        while True:
            wake_at = next_tick + max(0, core.next_due - core.now - 1) * tick_s
            with trio.move_on_at(wake_at) as scope:
                self._wait_scope = scope
                await trio.lowlevel.wait_readable(sock)
            self._wait_scope = None
            self.loop_wakeups += 1
            now = trio.current_time()
            if now >= next_tick:
                due = math.floor((now - next_tick) / tick_s) + 1
                for _ in range(min(due, _MAX_CATCH_UP_TICKS)):
                    core.tick()
                next_tick += due * tick_s
            self._read(sock, core)
            self._flush()
            if core.has_left and core.leave_complete:
                self._leave_done.set()

    def _poke(self) -> None:
        """Wake the loop: the core was handed something that may move its next timer."""
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    def _read(self, sock: socket.socket, core: GossipCore) -> None:
        for _ in range(_MAX_READ_BATCH):
            try:
                data, source = sock.recvfrom(65536)
            except BlockingIOError:
                return
            except OSError:
                # e.g. ECONNREFUSED reported for an earlier send: not about this read.
                continue
            if self.isolated:
                continue
            core.receive(data, (source[0], source[1]))

    def _flush(self) -> None:
        """Send what the core produced, publish its events, start push-pulls."""
        core = self._core
        sock = self._socket
        if core is None or sock is None:
            return
        for (host, port), data in core.datagrams_to_send():
            if self.isolated:
                continue
            target = host if _is_ip(host) else self._resolve(host)
            if target is None:
                continue
            try:
                sock.sendto(data, (target, port))
            except OSError:
                # A full buffer or an unreachable network: a lost datagram, as UDP allows.
                self.send_errors += 1
        events = core.events()
        if events:
            self._publish(events)
        if self._nursery is not None:
            for address in core.push_pulls_to_start():
                if not self.isolated:
                    self._nursery.start_soon(self._push_pull, address)

    def _resolve(self, host: str) -> str | None:
        """A cached IP for ``host``; None (drop this datagram) while it is resolved."""
        if host in self._resolved:
            return self._resolved[host]
        self._resolved[host] = None
        if self._nursery is not None:
            self._nursery.start_soon(self._resolve_task, host)
        return None

    async def _resolve_task(self, host: str) -> None:
        try:
            infos = await trio.socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
            self._resolved[host] = str(infos[0][4][0])
        except OSError as exc:
            log.warning("gossip cannot resolve %r: %s", host, exc)
            # Forget the failure after a while so the name is tried again.
            await trio.sleep(5)
            self._resolved.pop(host, None)

    def _publish(self, events: list[MemberEvent]) -> None:
        for event in events:
            log.info(
                "gossip %d: %s %d (%s, incarnation %d)",
                self.node_id,
                type(event).__name__,
                event.member.node_id,
                event.member.state.value,
                event.member.incarnation,
            )
        for channel in list(self._subscribers):
            try:
                for event in events:
                    channel.send_nowait(event)
            except trio.WouldBlock:
                log.warning("gossip subscriber fell behind; dropping it")
                self._subscribers.remove(channel)
                channel.close()
            except trio.BrokenResourceError:
                self._subscribers.remove(channel)

    async def _push_pull(self, address: Address) -> None:
        core, pool = self._core, self._pool
        if core is None or pool is None:
            return
        request = GossipPushPullRequest(payload=core.push_pull_state())
        try:
            response = await pool.call(
                format_address(*address), request, timeout=_PUSH_PULL_TIMEOUT_S
            )
        except (DlogError, OSError) as exc:
            log.debug("gossip push-pull with %s failed: %s", address, exc)
            return
        core.merge_push_pull(payload_bytes(response.payload))
        self._flush()
        self._poke()

    async def _on_push_pull(self, request: GossipPushPullRequest) -> GossipPushPullResponse:
        if self.isolated:
            raise NetworkError("isolated by a test hook")
        core = self._core
        if core is None:
            raise DlogError("gossip is not running")
        core.merge_push_pull(payload_bytes(request.payload))
        self._flush()
        self._poke()
        return GossipPushPullResponse(payload=core.push_pull_state())
