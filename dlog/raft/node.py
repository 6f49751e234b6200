"""RaftNode: the trio driver around the sans-I/O core.

::

    RaftNode.run()
    └── nursery
        ├── RpcServer        the Raft listener: ``raft_batch`` handled inline (steps the core)
        ├── ticker           core.tick() every ``tick_interval_s``
        ├── ready loop       persist (fsync) -> send -> apply -> advance; snapshots
        └── PeerSender       one per peer: batches of messages, one-way
    (and an RPC client pool, owned by ``run`` too)

The ready loop keeps the Ready contract: a Ready's snapshot, hard state and entries are
durable (fsync, in a worker thread) before its messages are handed to the senders, and
only then are committed entries applied. Proposals that arrive meanwhile are batched:
all of them go into the next Ready as one run of entries and one message per follower.

Who owns what: the caller opens and closes the :class:`DiskStorage` and owns the
state machine; ``run`` owns its server, client pool and tasks, and cancelling it stops
them all. Callers waiting in :meth:`propose`, :meth:`read_index` or a membership change
when ``run`` ends get BrokerNotAvailableError.

The state machine is called only from the ready loop, in log order: ``apply`` for each
committed normal entry (its return value is what :meth:`propose` returns on the node
that proposed it), ``snapshot`` when the log is to be compacted, ``restore`` at start
(from the stored snapshot) and when a leader sends a snapshot. An exception from it
stops the node: a state machine that cannot apply an entry cannot go on.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio
from trio_util import AsyncValue

from dlog.errors import (
    BrokerNotAvailableError,
    DlogError,
    InvalidConfigError,
    NotLeaderError,
    RequestTimedOutError,
)
from dlog.net.client import ClientConfig, RpcPool, open_rpc_pool
from dlog.net.server import Route, RpcServer, ServerConfig
from dlog.raft.codec import decode_configuration
from dlog.raft.core import ConfChangeInProgressError, CoreConfig, RaftCore
from dlog.raft.disk import DiskStorage
from dlog.raft.messages import (
    AnyMessage,
    AppendEntries,
    AppendResponse,
    ConfChange,
    ConfChangeType,
    Configuration,
    Entry,
    EntryType,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    InvalidConfChangeError,
    Ready,
    Role,
    SnapshotMeta,
    SnapshotResponse,
)
from dlog.raft.transport import (
    RAFT_BATCH,
    PeerSender,
    RaftBatchRequest,
    RaftBatchResponse,
    decode_batch,
)
from dlog.types import NodeId

log = logging.getLogger(__name__)


class StateMachine(Protocol):
    """What the Raft log drives. Called from one task, in log order."""

    def apply(self, index: int, data: bytes) -> Any:
        """Apply committed entry ``index``; the result goes back to its proposer."""
        ...

    def snapshot(self) -> bytes:
        """The whole state, as of the last applied entry."""
        ...

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot's."""
        ...


def _default_core() -> CoreConfig:
    # 50 ms ticks: heartbeats every 50 ms, elections after 0.5-1 s of silence.
    return CoreConfig(election_ticks=10, heartbeat_ticks=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class RaftConfig:
    node_id: NodeId
    cluster_id: str
    #: Where the Raft listener binds (port 0 picks one; ``run`` reports it).
    host: str = "127.0.0.1"
    port: int = 0
    #: The address others reach this node at (default ``host:bound port``).
    advertise: str | None = None
    tick_interval_s: float = 0.05
    core: CoreConfig = field(default_factory=_default_core)
    #: Most proposals turned into entries per Ready (the rest wait for the next).
    max_proposal_batch: int = 8192
    #: Snapshot the state machine (and compact the log) every this many applied entries.
    snapshot_interval_entries: int = 50_000
    #: Entries kept behind a snapshot, so a slightly slow follower needs no snapshot.
    snapshot_trailing_entries: int = 5_000
    #: Messages queued per peer before new ones are dropped (Raft retransmits).
    send_queue_messages: int = 50_000
    send_batch_bytes: int = 4 << 20
    #: Bytes written to a peer's connection and not yet taken by its socket before new
    #: batches to it are dropped (a slow or stopped peer).
    send_buffer_bytes: int = 16 << 20
    #: How long a batch for a peer may wait for a connection (connecting, or a
    #: reconnect backoff) before it is dropped.
    send_timeout_s: float = 2.0
    connect_timeout_s: float = 1.0
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> InvalidConfigError:
            return InvalidConfigError(f"raft config {key}: {why}", key=key)

        if not self.cluster_id:
            raise bad("cluster_id", "must be non-empty")
        if not 0 <= self.port <= 65535:
            raise bad("port", "must be 0-65535")
        if not 0 < self.tick_interval_s <= 10:
            raise bad("tick_interval_s", "must be in (0, 10] seconds")
        for key in (
            "max_proposal_batch",
            "snapshot_interval_entries",
            "send_queue_messages",
            "send_batch_bytes",
            "send_buffer_bytes",
        ):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        if self.snapshot_trailing_entries < 0:
            raise bad("snapshot_trailing_entries", "must be >= 0")
        if self.send_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise bad("send_timeout_s", "timeouts must be positive")

    @property
    def election_timeout_s(self) -> float:
        """The shortest election timeout, in seconds."""
        return self.core.election_ticks * self.tick_interval_s


@dataclass(frozen=True, slots=True, kw_only=True)
class RaftStatus:
    """What a node currently believes; observe it through :attr:`RaftNode.status`."""

    role: Role
    term: int
    leader: NodeId | None
    #: This node leads and has applied its term's no-op: its state machine holds every
    #: committed entry, so it may act on it (e.g. run the controller).
    leader_ready: bool = False


@dataclass(frozen=True, slots=True)
class PeerProgress:
    """How far a follower is, as this leader knows it."""

    match_index: int
    #: ``trio.current_time()`` of its last answer to this node (-inf: never).
    last_ack: float


class _Waiter:
    __slots__ = ("error", "event", "index", "result", "term")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: Any = None
        self.error: DlogError | None = None
        self.index = 0
        self.term = 0

    def resolve(self, result: Any) -> None:
        self.result = result
        self.event.set()

    def fail(self, error: DlogError) -> None:
        self.error = error
        self.event.set()

    async def wait(self) -> Any:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.result


class RaftNode:
    """One Raft member over dlog.net. See the module docstring."""

    def __init__(
        self,
        config: RaftConfig,
        *,
        storage: DiskStorage,
        state_machine: StateMachine,
        rng: random.Random | None = None,
    ) -> None:
        if storage.identity.node_id != config.node_id:
            raise InvalidConfigError("storage belongs to another node id", key="node_id")
        if storage.identity.cluster_id != config.cluster_id:
            raise InvalidConfigError("storage belongs to another cluster", key="cluster_id")
        self.config = config
        self.node_id = config.node_id
        self.storage = storage
        self.state_machine = state_machine
        self.core = RaftCore(
            node_id=config.node_id,
            directory_id=storage.directory_id,
            cluster_id=config.cluster_id,
            storage=storage,
            config=config.core,
            rng=rng or random.Random(),
        )
        self.status: AsyncValue[RaftStatus] = AsyncValue(self._current_status(False))
        #: Index of the last entry applied to the state machine.
        self.applied_index: AsyncValue[int] = AsyncValue(0)
        self.port: int | None = None
        self._wake = trio.Event()
        self._proposals: list[bytes] = []
        self._proposal_waiters: list[_Waiter] = []
        self._waiters: dict[int, _Waiter] = {}
        self._reads: dict[bytes, _Waiter] = {}
        self._read_ids = itertools.count(1)
        self._senders: dict[NodeId, PeerSender] = {}
        self._last_ack: dict[NodeId, float] = {}
        #: Addresses peers announced in their batches; used for nodes that no
        #: configuration we know of lists (we are new and our log is empty).
        self._announced: dict[NodeId, str] = {}
        self.address = ""
        self._leader_contact = -math.inf
        self._unsaved_hard_state: HardState | None = None
        self._applied_config = Configuration()
        self._leader_ready = False
        self._last_snapshot_index = 0
        self._nursery: trio.Nursery | None = None
        self._pool: RpcPool | None = None
        self._running = False

    # --- lifecycle ---------------------------------------------------------------------

    def bootstrap(self, config: Configuration) -> bool:
        """Start a new cluster whose first configuration is ``config``.

        A no-op (returns False) when this node has any Raft state, so it is safe to
        call on every start of every initial node.
        """
        done = self.core.bootstrap(config)
        if done:
            log.info("node %d bootstrapped a cluster: voters %s", self.node_id, config.voter_ids)
            self._wake.set()
        return done

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started(bound_port)`` once listening."""
        if self._running:
            raise RuntimeError("RaftNode.run is already running")
        self._running = True
        snapshot = self.storage.snapshot()
        if snapshot.meta.index:
            self.state_machine.restore(snapshot.data)
            self._applied_config = snapshot.meta.config
            self._last_snapshot_index = snapshot.meta.index
        self.applied_index.value = self.core.log.applied
        cfg = self.config
        server = RpcServer(
            {RAFT_BATCH: Route(self._on_batch, inline=True)},
            config=cfg.server,
            name=f"raft-{self.node_id}",
        )
        client_config = ClientConfig(
            connect_timeout_s=cfg.connect_timeout_s,
            request_timeout_s=cfg.send_timeout_s,
            max_outbox_bytes=cfg.send_buffer_bytes,
            reconnect_backoff_max_s=max(0.05, cfg.election_timeout_s / 2),
        )
        try:
            async with open_rpc_pool(client_config) as pool, trio.open_nursery() as nursery:
                self._pool = pool
                self._nursery = nursery
                self.port = await nursery.start(server.run, cfg.host, cfg.port)
                self.address = cfg.advertise or f"{cfg.host}:{self.port}"
                nursery.start_soon(self._ready_loop)
                nursery.start_soon(self._ticker)
                self._wake.set()
                task_status.started(self.port)
        finally:
            self._nursery = None
            self._pool = None
            self._running = False
            self._fail_all(BrokerNotAvailableError(f"raft node {self.node_id} stopped"))

    def _fail_all(self, error: DlogError) -> None:
        for w in self._proposal_waiters:
            w.fail(error)
        self._proposals.clear()
        self._proposal_waiters.clear()
        for w in self._waiters.values():
            w.fail(error)
        self._waiters.clear()
        for w in self._reads.values():
            w.fail(error)
        self._reads.clear()

    # --- observing -------------------------------------------------------------------------

    @property
    def role(self) -> Role:
        return self.core.role

    @property
    def term(self) -> int:
        return self.core.term

    @property
    def leader(self) -> NodeId | None:
        return self.core.leader

    @property
    def directory_id(self) -> str:
        return self.storage.directory_id

    def commit_index(self) -> int:
        return self.core.log.committed

    def members(self) -> Configuration:
        """The configuration in force on this node (voters and learners, with addresses)."""
        return self.core.config

    def follower_progress(self) -> dict[NodeId, PeerProgress]:
        """On the leader: each follower's match index and time of its last answer."""
        if self.core.role is not Role.LEADER:
            return {}
        out = {}
        for member in (*self.core.config.voters, *self.core.config.learners):
            pr = self.core.progress(member.node_id)
            if pr is not None:
                out[member.node_id] = PeerProgress(
                    pr.match, self._last_ack.get(member.node_id, -math.inf)
                )
        return out

    def heard_from_leader_within(self, seconds: float) -> bool:
        """Has this node been in touch with a working leader in the last ``seconds``?

        On the leader: has a quorum of voters answered it that recently. A node cut off
        from the quorum stops acting on its (possibly stale) view within this bound.
        """
        now = trio.current_time()
        core = self.core
        if core.role is Role.LEADER:
            voters = core.config.voter_ids
            if not voters:
                return False
            times = sorted(
                (now if v == self.node_id else self._last_ack.get(v, -math.inf) for v in voters),
                reverse=True,
            )
            return now - times[len(times) // 2] <= seconds
        return core.leader is not None and now - self._leader_contact <= seconds

    @property
    def last_leader_contact(self) -> float:
        """Trio time of the last message from a leader of the then-current term
        (-inf if none yet). Unlike :meth:`heard_from_leader_within`, it survives an
        election clearing the known leader."""
        return self._leader_contact

    async def wait_leader_ready(self) -> RaftStatus:
        """Until this node leads and has applied its term's no-op."""
        status: RaftStatus = await self.status.wait_value(lambda s: s.leader_ready)
        return status

    async def wait_not_leader(self) -> RaftStatus:
        """Until this node no longer leads (in the term it led when called)."""
        term = self.core.term
        status: RaftStatus = await self.status.wait_value(
            lambda s: s.role is not Role.LEADER or s.term != term
        )
        return status

    def _current_status(self, leader_ready: bool) -> RaftStatus:
        core = self.core
        return RaftStatus(
            role=core.role,
            term=core.term,
            leader=core.leader,
            leader_ready=leader_ready and core.role is Role.LEADER,
        )

    def _publish_status(self) -> None:
        if self.core.role is not Role.LEADER:
            self._leader_ready = False
        status = self._current_status(self._leader_ready)
        if status != self.status.value:
            self.status.value = status

    # --- proposing ---------------------------------------------------------------------

    def _check_leader(self) -> None:
        core = self.core
        if core.role is not Role.LEADER:
            raise NotLeaderError(leader=core.leader)
        if core.lead_transferee is not None:
            raise NotLeaderError("leadership transfer in progress", leader=None)

    async def propose(self, data: bytes) -> Any:
        """Append ``data`` to the log; returns what the state machine's ``apply``
        returned for it on this node, once committed and applied here.

        Raises NotLeaderError (with the known leader) if this node does not lead. If
        leadership is lost after the entry was appended, the call still ends when
        that log index is applied: with the result if the entry survived, with
        NotLeaderError if another leader's entry took its place. Bound the wait with a
        timeout at the call site.
        """
        self._check_leader()
        waiter = _Waiter()
        self._proposals.append(data)
        self._proposal_waiters.append(waiter)
        self._wake.set()
        return await waiter.wait()

    def _flush_proposals(self) -> None:
        if not self._proposals:
            return
        limit = self.config.max_proposal_batch
        datas, self._proposals = self._proposals[:limit], self._proposals[limit:]
        waiters = self._proposal_waiters[:limit]
        self._proposal_waiters = self._proposal_waiters[limit:]
        try:
            first = self.core.propose_batch(datas)
        except NotLeaderError as exc:
            for w in waiters:
                w.fail(exc)
            return
        term = self.core.term
        for i, w in enumerate(waiters):
            w.index = first + i
            w.term = term
            self._waiters[first + i] = w

    # --- reading -----------------------------------------------------------------------

    async def read_index(self) -> int:
        """A linearizable read barrier (ReadIndex; no clock-based lease).

        Returns once this node's state machine has applied every entry committed
        before the call; the returned index is that commit index. Raises
        NotLeaderError when no leader is known. Retries (with a new request) after an
        election timeout without an answer; bound it with a timeout at the call site.
        """
        while True:
            context = b"%d:%d" % (self.node_id, next(self._read_ids))
            waiter = _Waiter()
            self._reads[context] = waiter
            try:
                self.core.read_index(context)
            except NotLeaderError:
                del self._reads[context]
                raise
            self._wake.set()
            index: int | None = None
            with trio.move_on_after(2 * self.config.election_timeout_s):
                index = await waiter.wait()
            self._reads.pop(context, None)
            if index is not None:
                break
        await self.applied_index.wait_value(lambda applied: applied >= index)
        return index

    # --- membership and leadership --------------------------------------------------------

    async def add_learner(self, node_id: NodeId, directory_id: str, address: str) -> None:
        """Add a non-voting member; returns once the change is committed and applied."""
        await self._change(
            ConfChange(
                type=ConfChangeType.ADD_LEARNER,
                node_id=node_id,
                directory_id=directory_id,
                address=address,
            )
        )

    async def add_voter(self, node_id: NodeId, directory_id: str, address: str) -> None:
        """Add a voter directly (prefer a learner, promoted once caught up)."""
        await self._change(
            ConfChange(
                type=ConfChangeType.ADD_VOTER,
                node_id=node_id,
                directory_id=directory_id,
                address=address,
            )
        )

    async def promote_learner(self, node_id: NodeId, directory_id: str | None = None) -> None:
        """Make a learner a voter; with ``directory_id``, only that incarnation of it."""
        self._check_member(node_id, directory_id)
        await self._change(ConfChange(type=ConfChangeType.PROMOTE_LEARNER, node_id=node_id))

    async def remove_member(self, node_id: NodeId, directory_id: str | None = None) -> None:
        """Remove a voter or learner; with ``directory_id``, only that incarnation."""
        self._check_member(node_id, directory_id)
        await self._change(ConfChange(type=ConfChangeType.REMOVE_NODE, node_id=node_id))

    def _check_member(self, node_id: NodeId, directory_id: str | None) -> None:
        member = self.core.config.member(node_id)
        if member is None:
            raise InvalidConfChangeError(f"node {node_id} is not a member")
        if directory_id is not None and member.directory_id != directory_id:
            raise InvalidConfChangeError(
                f"node {node_id} is a member with directory id {member.directory_id}, "
                f"not {directory_id}"
            )

    async def _change(self, change: ConfChange) -> None:
        """Propose a membership change once the core takes one (its term has a
        committed entry and no other change is pending); wait until it is applied."""
        while True:
            self._check_leader()
            try:
                index = self.core.propose_conf_change(change)
                break
            except ConfChangeInProgressError:
                applied = self.applied_index.value
                term = self.core.term
                with trio.move_on_after(self.config.election_timeout_s):
                    await self.applied_index.wait_value(lambda v, seen=applied: v > seen)
                if self.core.term != term:
                    raise NotLeaderError(leader=self.core.leader) from None
        waiter = _Waiter()
        waiter.index = index
        waiter.term = self.core.term
        self._waiters[index] = waiter
        self._wake.set()
        log.info("node %d: proposed %s of node %d", self.node_id, change.type.value, change.node_id)
        await waiter.wait()

    async def transfer_leadership(self, target: NodeId | None = None) -> NodeId | None:
        """Hand leadership to ``target`` (default: the most up-to-date voter).

        Returns the new leader once this node has stepped down; raises
        RequestTimedOutError if the transfer did not finish within two election
        timeouts, NotLeaderError if this node does not lead.
        """
        core = self.core
        if core.role is not Role.LEADER:
            raise NotLeaderError(leader=core.leader)
        if target is None:
            best = -1
            for voter in core.config.voter_ids:
                pr = core.progress(voter)
                if voter != self.node_id and pr is not None and pr.match > best:
                    target, best = voter, pr.match
            if target is None:
                return None  # the only voter: nobody to hand over to
        term = core.term
        core.transfer_leadership(target)
        self._wake.set()
        with trio.move_on_after(2 * self.config.election_timeout_s):
            status: RaftStatus = await self.status.wait_value(
                lambda s: s.role is not Role.LEADER or s.term != term
            )
            return status.leader
        raise RequestTimedOutError(f"leadership transfer to node {target} did not finish")

    async def step_down(self) -> None:
        """Hand leadership over if this node leads (controlled shutdown); never raises
        for a transfer that fails (the others will elect someone soon anyway)."""
        if self.core.role is not Role.LEADER:
            return
        try:
            await self.transfer_leadership()
        except DlogError as exc:
            log.info("node %d: leadership transfer failed: %s", self.node_id, exc)

    # --- the network side -----------------------------------------------------------------

    def _on_batch(self, request: RaftBatchRequest) -> RaftBatchResponse:
        msgs = decode_batch(request)
        now = trio.current_time()
        core = self.core
        if request.sender_address and msgs:
            self._announced[msgs[0].from_id] = request.sender_address
        for m in msgs:
            core.step(m)
            if isinstance(m, AppendResponse | HeartbeatResponse | SnapshotResponse):
                # Only the member itself: a wiped node answering under the same node id
                # (a new directory id; the core refuses it) keeps no old identity alive.
                member = core.config.member(m.from_id)
                if member is not None and member.directory_id == m.from_dir:
                    self._last_ack[m.from_id] = now
            elif (
                isinstance(m, AppendEntries | Heartbeat | InstallSnapshot)
                and core.leader == m.from_id
                and core.term == m.term
            ):
                self._leader_contact = now
        self._wake.set()
        return RaftBatchResponse()

    def _send(self, msg: AnyMessage) -> None:
        sender = self._senders.get(msg.to)
        if sender is None:
            if self._pool is None or self._nursery is None:
                return
            cfg = self.config
            sender = PeerSender(
                msg.to,
                self._pool,
                max_queue=cfg.send_queue_messages,
                max_batch_bytes=cfg.send_batch_bytes,
                timeout_s=cfg.send_timeout_s,
                own_address=self.address,
            )
            self._senders[msg.to] = sender
            self._nursery.start_soon(sender.run)
        sender.send(msg, self.core.address_of(msg.to) or self._announced.get(msg.to))

    # --- the driver loops -------------------------------------------------------------------

    async def _ticker(self) -> None:
        interval = self.config.tick_interval_s
        deadline = trio.current_time()
        while True:
            deadline += interval
            await trio.sleep_until(deadline)
            now = trio.current_time()
            if now > deadline + interval:
                deadline = now  # we fell behind (a long fsync, a paused process): resync
            self.core.tick()
            self._wake.set()

    async def _ready_loop(self) -> None:
        core = self.core
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while True:
                self._flush_proposals()
                rd = core.ready()
                if rd is None:
                    break
                await self._handle_ready(rd)

    async def _handle_ready(self, rd: Ready) -> None:
        core = self.core
        if rd.soft_state is not None:
            self._publish_status()
        if rd.send_before_persist:
            for m in rd.messages:
                self._send(m)
        if rd.entries or rd.snapshot is not None or rd.must_sync:
            hard_state = rd.hard_state or self._unsaved_hard_state
            self._unsaved_hard_state = None
            await self.storage.save(
                hard_state=hard_state,
                entries=rd.entries,
                snapshot=rd.snapshot,
                sync=rd.must_sync or rd.snapshot is not None,
            )
        elif rd.hard_state is not None:
            # Only the commit index moved. It can always be learnt again from the
            # leader, so it is written with the next entries, not on its own: that
            # would put a disk write between commit and apply.
            self._unsaved_hard_state = rd.hard_state
        if not rd.send_before_persist:
            for m in rd.messages:
                self._send(m)
        if rd.snapshot is not None:
            self.state_machine.restore(rd.snapshot.data)
            self._applied_config = rd.snapshot.meta.config
            self._last_snapshot_index = rd.snapshot.meta.index
            lost = [i for i in self._waiters if i <= rd.snapshot.meta.index]
            for i in lost:
                # Committed, but applied through a snapshot: the outcome is unknown here.
                self._waiters.pop(i).fail(NotLeaderError(leader=core.leader))
        for e in rd.committed_entries:
            self._apply(e)
        for rs in rd.read_states:
            waiter = self._reads.pop(rs.context, None)
            if waiter is not None:
                waiter.resolve(rs.index)
        core.advance(rd)
        self._publish_status()
        applied = core.log.applied
        if applied != self.applied_index.value:
            self.applied_index.value = applied
        if applied - self._last_snapshot_index >= self.config.snapshot_interval_entries:
            await self._take_snapshot(applied)

    def _apply(self, e: Entry) -> None:
        result: Any = None
        if e.type is EntryType.NORMAL:
            result = self.state_machine.apply(e.index, e.data)
        elif e.type is EntryType.CONFIG:
            self._applied_config = decode_configuration(e.data)
        elif e.term == self.core.term and self.core.role is Role.LEADER:
            self._leader_ready = True  # our own no-op: everything committed is applied
        waiter = self._waiters.pop(e.index, None)
        if waiter is not None:
            if waiter.term == e.term:
                waiter.resolve(result)
            else:
                waiter.fail(NotLeaderError(leader=self.core.leader))

    async def _take_snapshot(self, index: int) -> None:
        storage = self.storage
        meta = SnapshotMeta(index=index, term=storage.term(index), config=self._applied_config)
        await storage.save_snapshot(meta, self.state_machine.snapshot())
        self._last_snapshot_index = index
        keep_from = index - self.config.snapshot_trailing_entries
        if keep_from > storage.first_index() - 1:
            await storage.compact_to(keep_from)
        log.debug(
            "node %d: snapshot at %d, log from %d", self.node_id, index, storage.first_index()
        )
