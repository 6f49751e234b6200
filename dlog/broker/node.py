"""The Broker: one dlog node, as one trio nursery tree.

::

    Broker.run()
    └── nursery
        ├── LogManager        every partition log; flush + retention tasks
        ├── RpcServer         --rpc: clients and brokers (pipelined)
        ├── GossipNode        --gossip: UDP, push-pull over TCP on the same port number
        ├── RaftNode          --raft: the metadata log (own RpcServer), apply loop
        ├── ReplicaManager    partitions, one fetcher per followed partition
        ├── controller supervisor   runs the Controller while this node leads Raft
        │                           (its own cancel scope; cancelled on losing leadership)
        ├── registration      registers this broker (and each restart) with the controller
        └── gossip watcher    wakes the controller on membership events

Start-up: lock the data directory, load or format its identity (a new cluster with
``--bootstrap-cluster``, else the cluster id learned from gossip seeds), start the
layers bottom-up, write the bound ports to ``ports.json``, then register. Shutdown:
:meth:`Broker.shutdown` asks the controller to move this node's leaderships away
(bounded by ``controlled_shutdown_timeout_ms``), hands over Raft leadership, leaves
gossip, and cancels the tree; every component flushes and closes in ``finally``.
"""

from __future__ import annotations

import gc
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import trio

import dlog
from dlog.broker.config import BrokerConfig
from dlog.broker.controller import Controller, GossipView, QuorumMember
from dlog.broker.handlers import BrokerHandlers
from dlog.broker.identity import (
    PORTS_FILE,
    DirectoryLock,
    NodeIdentity,
    format_directory,
    load_identity,
    mark_removed,
    new_cluster_id,
    write_json_atomically,
)
from dlog.broker.metadata import MetadataDelta, MetadataImage
from dlog.broker.offsets import GroupCoordinator
from dlog.broker.quorum import RaftQuorum
from dlog.broker.replica_manager import ReplicaManager, ReplicaManagerHooks
from dlog.clock import SystemClock, WallClock
from dlog.errors import (
    BrokerIdNotRegisteredError,
    BrokerNotAvailableError,
    DlogError,
    InvalidConfigError,
    NetworkError,
    NotControllerError,
    RequestTimedOutError,
)
from dlog.gossip import GossipNode, MemberState
from dlog.net.address import parse_address
from dlog.net.client import ClientConfig, RpcPool, open_rpc_pool
from dlog.net.messages import Message
from dlog.net.protocol import (
    BrokerRegistrationRequest,
    ControlledShutdownRequest,
    ControlledShutdownResponse,
    DescribeClusterRequest,
    DescribeClusterResponse,
)
from dlog.net.server import RpcServer, ServerConfig
from dlog.storage import LogConfig, LogManager

log = logging.getLogger(__name__)

#: How long a new node with --bootstrap-cluster listens to gossip for an existing
#: cluster before it starts one (gossip joins a live seed within a few probe periods).
_BOOTSTRAP_LOOKAROUND_S = 2.0


@dataclass(frozen=True, slots=True)
class BoundAddresses:
    """What a started broker listens on and advertises."""

    rpc: str
    gossip: str
    raft: str


class Broker:
    """One node. ``await nursery.start(broker.run)`` returns its :class:`BoundAddresses`."""

    def __init__(self, config: BrokerConfig, *, clock: WallClock | None = None) -> None:
        self.config = config
        self.node_id = config.node_id
        self.clock = clock or SystemClock()
        self.incarnation = secrets.token_hex(8)
        self.image = MetadataImage()
        self.identity: NodeIdentity | None = None
        self.controller: Controller | None = None
        self.addresses: BoundAddresses | None = None
        self._pool: RpcPool | None = None
        self._gossip: GossipNode | None = None
        self._quorum: RaftQuorum | None = None
        self._replicas: ReplicaManager | None = None
        self._coordinator: GroupCoordinator | None = None
        self._rpc_server: RpcServer | None = None
        self._cancel_scope: trio.CancelScope | None = None
        self._registered_index = -1
        self._caught_up_once = False
        #: Set when the controller refused this node's registration because it was
        #: removed from the cluster for good (``dlogctl node remove``); the node stops.
        self.removed = False
        self.stopped = trio.Event()

    # --- accessors used by handlers and components ----------------------------------------

    @property
    def cluster_id(self) -> str:
        if self.identity is None:
            raise BrokerNotAvailableError(f"node {self.node_id} is still starting")
        return self.identity.cluster_id

    @property
    def pool(self) -> RpcPool:
        assert self._pool is not None
        return self._pool

    @property
    def replicas(self) -> ReplicaManager:
        assert self._replicas is not None
        return self._replicas

    @property
    def coordinator(self) -> GroupCoordinator:
        assert self._coordinator is not None
        return self._coordinator

    @property
    def quorum(self) -> RaftQuorum:
        assert self._quorum is not None
        return self._quorum

    @property
    def gossip(self) -> GossipNode:
        assert self._gossip is not None
        return self._gossip

    @property
    def rpc_server(self) -> RpcServer:
        assert self._rpc_server is not None
        return self._rpc_server

    def controller_id(self) -> int | None:
        return None if self._quorum is None else self._quorum.leader_id()

    def quorum_members(self) -> list[QuorumMember]:
        return [] if self._quorum is None else self._quorum.members()

    def gossip_view(self) -> GossipView:
        if self._gossip is None:
            return GossipView(alive=frozenset(), dead=frozenset())
        alive, dead = set(), set()
        for m in self._gossip.members():
            if m.state in (MemberState.ALIVE, MemberState.SUSPECT):
                alive.add(int(m.node_id))
            else:
                dead.add(int(m.node_id))
        return GossipView(alive=frozenset(alive), dead=frozenset(dead))

    def controller_address(self) -> str | None:
        leader = self.controller_id()
        if leader is None:
            return None
        broker = self.image.brokers.get(leader)
        if broker is not None:
            return broker.rpc
        if self._gossip is not None:
            member = self._gossip.member(leader)  # type: ignore[arg-type]
            if member is not None and member.metadata.get("rpc"):
                return member.metadata["rpc"]
        return None

    async def call_controller(self, request: Message, *, timeout: float | None = None) -> Message:
        """Forward ``request`` to the controller (NotControllerError if none is known)."""
        address = self.controller_address()
        if address is None:
            raise NotControllerError("no controller is known right now", controller=None)
        limit = self.config.request_timeout_ms / 1000 if timeout is None else timeout
        return await self.pool.call(address, request, timeout=limit)

    # --- running ------------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[BoundAddresses] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the node until cancelled or :meth:`shutdown`. See the module docstring."""
        cfg = self.config
        data_dir = Path(cfg.data_dir)
        lock = DirectoryLock(data_dir)
        try:
            with trio.CancelScope() as scope:
                self._cancel_scope = scope
                await self._run(data_dir, task_status)
        finally:
            lock.release()
            self.stopped.set()

    async def _run(self, data_dir: Path, task_status: trio.TaskStatus[BoundAddresses]) -> None:
        cfg = self.config
        client_config = ClientConfig(
            request_timeout_s=cfg.request_timeout_ms / 1000,
            connect_timeout_s=2.0,
            reconnect_backoff_s=0.05,
            reconnect_backoff_max_s=1.0,
            max_frame_bytes=cfg.max_frame_bytes,
        )
        async with open_rpc_pool(client_config) as pool, trio.open_nursery() as nursery:
            self._pool = pool
            logs = LogManager(data_dir / "logs", clock=self.clock, default_config=LogConfig())
            await nursery.start(logs.run)
            self._replicas = ReplicaManager(
                cfg,
                logs,
                pool,
                ReplicaManagerHooks(
                    image=lambda: self.image,
                    controller_address=self.controller_address,
                    session_ok=self._session_ok,
                ),
                self.clock,
            )
            self._coordinator = GroupCoordinator(
                self._replicas, self.clock, commit_timeout_s=cfg.request_timeout_ms / 1000
            )
            handlers = BrokerHandlers(self)
            self._rpc_server = RpcServer(
                handlers.routes(),
                config=ServerConfig(max_frame_bytes=cfg.max_frame_bytes),
                name=f"node{self.node_id}.rpc",
            )
            rpc_host, rpc_port = parse_address(cfg.rpc)
            bound_rpc = await nursery.start(self._rpc_server.run, rpc_host, rpc_port)
            advertised_rpc = cfg.advertised("rpc", bound_rpc)

            identity = load_identity(data_dir, cfg.node_id)
            gossip_host, gossip_port = parse_address(cfg.gossip)
            adv_gossip_host, adv_gossip_port = parse_address(cfg.advertised("gossip"))
            self._gossip = GossipNode(
                node_id=cfg.node_id,  # type: ignore[arg-type]
                host=gossip_host,
                port=gossip_port,
                seeds=cfg.join,
                metadata=self._gossip_metadata(advertised_rpc, "", identity),
                advertise_host=adv_gossip_host,
                advertise_port=adv_gossip_port or None,
            )
            bound_gossip = await nursery.start(self._gossip.run)
            advertised_gossip = cfg.advertised("gossip", bound_gossip)

            if identity is None:
                identity = await self._format(data_dir)
            self.identity = identity
            log.info(
                "node %d: cluster %s, directory %s",
                cfg.node_id,
                identity.cluster_id,
                identity.directory_id,
            )

            raft_host, raft_port = parse_address(cfg.raft)
            self._quorum = RaftQuorum(
                node_id=cfg.node_id,
                identity=identity,
                data_dir=data_dir / "raft",
                host=raft_host,
                port=raft_port,
                advertise=cfg.advertise_raft,
                apply=self._on_metadata,
                restore=self._on_snapshot,
                snapshot=self.image.snapshot,
            )
            # The quorum may have minted a new directory id (its Raft state was lost).
            identity = self.identity = self._quorum.identity
            bound_raft = await nursery.start(self._quorum.run)
            advertised_raft = cfg.advertised("raft", bound_raft)
            if cfg.bootstrap_cluster and self._quorum.bootstrap(advertised_raft):
                log.info("bootstrapped a new cluster %s", identity.cluster_id)
            self._gossip.update_metadata(
                self._gossip_metadata(advertised_rpc, advertised_raft, identity)
            )
            self.addresses = BoundAddresses(advertised_rpc, advertised_gossip, advertised_raft)
            write_json_atomically(
                data_dir / PORTS_FILE,
                {
                    "node_id": cfg.node_id,
                    "rpc": advertised_rpc,
                    "gossip": advertised_gossip,
                    "raft": advertised_raft,
                },
            )
            await nursery.start(self._replicas.run)
            nursery.start_soon(self._supervise_controller)
            nursery.start_soon(self._register_loop)
            nursery.start_soon(self._watch_gossip)
            # Long-lived start-up state is done: keep the collector off it (p99 latency).
            gc.collect()
            gc.freeze()
            log.info(
                "node %d up: rpc %s, gossip %s, raft %s",
                cfg.node_id,
                advertised_rpc,
                advertised_gossip,
                advertised_raft,
            )
            task_status.started(self.addresses)

    def _gossip_metadata(
        self, rpc: str, raft: str, identity: NodeIdentity | None
    ) -> dict[str, str]:
        meta = {"rpc": rpc, "version": dlog.__version__}
        if raft:
            meta["raft"] = raft
        if identity is not None:
            meta["cluster_id"] = identity.cluster_id
        return meta

    async def _format(self, data_dir: Path) -> NodeIdentity:
        """A new directory: join the cluster gossip knows of, or start a new one.

        With ``--bootstrap-cluster`` a new cluster is started only if the seeds show
        none within ``_BOOTSTRAP_LOOKAROUND_S``: a bootstrap node whose disk was lost
        while the others kept running must rejoin them, not split off a second cluster.
        """
        if not self.config.bootstrap_cluster and not self.config.join:
            raise InvalidConfigError(
                "this data directory is new: pass --bootstrap-cluster to start a cluster "
                "or --join HOST:PORT to join one"
            )
        if self.config.join:
            log.info("looking for a cluster through the seeds %s", ", ".join(self.config.join))
        deadline = trio.current_time() + _BOOTSTRAP_LOOKAROUND_S
        while True:
            for member in self.gossip.members():
                cluster_id = member.metadata.get("cluster_id")
                if int(member.node_id) != self.node_id and cluster_id:
                    if self.config.bootstrap_cluster:
                        log.warning(
                            "not bootstrapping: node %d is already in cluster %s; joining it",
                            member.node_id,
                            cluster_id,
                        )
                    return format_directory(data_dir, cluster_id, self.config.node_id)
            if self.config.bootstrap_cluster and (
                not self.config.join or trio.current_time() >= deadline
            ):
                return format_directory(data_dir, new_cluster_id(), self.config.node_id)
            await trio.sleep(0.1)

    # --- metadata ----------------------------------------------------------------------------

    def _on_metadata(self, index: int, data: bytes) -> MetadataDelta:
        """Raft apply callback: update the image, then let the data plane follow."""
        delta = self.image.apply_entry(index, data)
        self._after_metadata(delta)
        return delta

    def _on_snapshot(self, data: bytes) -> None:
        delta = self.image.restore(data)
        self._after_metadata(delta)

    def _after_metadata(self, delta: MetadataDelta) -> None:
        """Let the data plane follow the metadata -- from the moment the controller
        unfences this process on. Before that the image is whatever the local Raft log
        replays (a node that restarts goes through every state it once saw: leading,
        following, at old epochs) and acting on it would truncate replicas to stale
        leaders; the controller unfences a broker once it has caught up with the
        metadata log and holds no leadership from before (see reconcile), so from
        then on the image is current. (Kafka's brokers wait for their metadata to
        catch up the same way.)"""
        if self.controller is not None:
            self.controller.wake()
        replicas = self._replicas
        if replicas is None:
            return
        if self._caught_up_once:
            if not delta.empty:
                replicas.on_metadata(delta)
            return
        me = self.image.brokers.get(self.node_id)
        if me is not None and me.incarnation == self.incarnation and not me.fenced:
            self._caught_up_once = True
            log.info(
                "node %d: unfenced with metadata at %d; serving replicas",
                self.node_id,
                self.image.applied_index,
            )
            replicas.start_serving(self.image)

    def _session_ok(self) -> bool:
        if self._quorum is None:
            return False
        return self._quorum.heard_from_leader_within(self.config.broker_session_timeout_ms / 1000)

    # --- background tasks ------------------------------------------------------------------------

    async def _supervise_controller(self) -> None:
        """Run the Controller exactly while this node is a ready Raft leader."""
        quorum = self.quorum
        assert self.identity is not None
        while True:
            await quorum.wait_leader_ready()
            controller = Controller(
                self.config,
                quorum,
                image=lambda: self.image,
                gossip=self.gossip_view,
                cluster_id=self.identity.cluster_id,
            )
            self.controller = controller
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(controller.run)
                    await quorum.wait_not_leader()
                    nursery.cancel_scope.cancel()
            finally:
                self.controller = None

    async def _register_loop(self) -> None:
        """Register this process (incarnation) with the controller; again whenever the
        metadata stops showing our current registration."""
        assert self.addresses is not None
        assert self.identity is not None
        request = BrokerRegistrationRequest(
            node_id=self.node_id,
            directory_id=self.identity.directory_id,
            cluster_id=self.identity.cluster_id,
            incarnation=self.incarnation,
            rpc=self.addresses.rpc,
            gossip=self.addresses.gossip,
            raft=self.addresses.raft,
        )
        backoff = 0.1
        while True:
            me = self.image.brokers.get(self.node_id)
            registered = (
                me is not None
                and me.incarnation == self.incarnation
                and (me.rpc, me.gossip, me.raft, me.directory_id)
                == (request.rpc, request.gossip, request.raft, request.directory_id)
            )
            if registered:
                backoff = 0.1
                await trio.sleep(1.0)
                continue
            try:
                controller = self.controller
                if controller is not None and controller.active:
                    await controller.register_broker(request)
                else:
                    address = self.controller_address() or await self._discover_controller()
                    if address is None:
                        raise NotControllerError("no controller known yet")
                    await self.pool.call(address, request, timeout=5)
                log.info("registered with the controller (incarnation %s)", self.incarnation)
                await trio.sleep(0.5)
            except BrokerIdNotRegisteredError as exc:
                # Only a removed node's registration is refused so: nothing this process
                # can do will bring it back, so it leaves rather than linger half-joined.
                log.error("%s; stopping", exc.message)
                self.removed = True
                try:  # so that tools need not start it to learn this (cluster up skips it)
                    mark_removed(Path(self.config.data_dir), exc.message)
                except OSError:
                    log.exception("could not mark %s as removed", self.config.data_dir)
                if self._gossip is not None:
                    await self._gossip.leave(timeout_s=0.5)
                if self._cancel_scope is not None:
                    self._cancel_scope.cancel()
                return
            except DlogError as exc:
                log.debug("registration not done yet: %s", exc)
                await trio.sleep(backoff)
                backoff = min(1.0, backoff * 2)

    async def _discover_controller(self) -> str | None:
        """Ask brokers gossip knows about who the controller is (for a node that is not
        a Raft member yet and so does not know the leader itself)."""
        for member in self.gossip.members():
            rpc = member.metadata.get("rpc")
            if int(member.node_id) == self.node_id or not rpc:
                continue
            if member.state not in (MemberState.ALIVE, MemberState.SUSPECT):
                continue
            try:
                reply = await self.pool.call(rpc, DescribeClusterRequest(), timeout=2)
            except DlogError:
                continue
            if not isinstance(reply, DescribeClusterResponse) or reply.controller is None:
                continue
            for broker in reply.brokers:
                if broker.node_id == reply.controller:
                    return broker.rpc
            if reply.controller == int(member.node_id):
                return rpc
        return None

    async def _watch_gossip(self) -> None:
        while True:
            async with self.gossip.subscribe() as events:
                async for _event in events:
                    if self.controller is not None:
                        self.controller.wake()
            await trio.sleep(0.1)

    # --- shutdown -------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Controlled shutdown, bounded by ``controlled_shutdown_timeout_ms``; then stop."""
        timeout = self.config.controlled_shutdown_timeout_ms / 1000
        log.info("node %d: controlled shutdown", self.node_id)
        with trio.move_on_after(timeout):
            await self._move_leaderships_away()
            if self._quorum is not None:
                await self._quorum.step_down()
            if self._gossip is not None:
                await self._gossip.leave(timeout_s=0.5)
        if self._rpc_server is not None:
            with trio.move_on_after(0.5):
                await self._rpc_server.drain(0.5)
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        await self.stopped.wait()

    async def _move_leaderships_away(self) -> None:
        if self._replicas is None or self.identity is None:
            return
        request = ControlledShutdownRequest(broker_id=self.node_id, incarnation=self.incarnation)
        while True:
            try:
                controller = self.controller
                reply: Message
                if controller is not None and controller.active:
                    reply = await controller.controlled_shutdown(request)
                else:
                    reply = await self.call_controller(request, timeout=2)
                assert isinstance(reply, ControlledShutdownResponse)
                if reply.remaining_leaderships == 0:
                    return
                log.info(
                    "controlled shutdown: %d leadership(s) cannot move yet",
                    reply.remaining_leaderships,
                )
            except (NetworkError, RequestTimedOutError, NotControllerError) as exc:
                log.info("controlled shutdown: controller unreachable: %s", exc)
            except DlogError as exc:
                log.warning("controlled shutdown refused: %s", exc)
                return
            await trio.sleep(0.2)
