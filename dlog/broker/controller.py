"""The controller: the Raft leader's duties toward the cluster metadata.

Ownership: the Broker starts :meth:`Controller.run` in its own cancel scope when this
node becomes Raft leader and its term's no-op entry is applied, and cancels it the
moment leadership is lost. Every decision is made under one lock from the applied
metadata image and proposed through Raft; the lock is held until the proposal is
applied, so the next decision sees the previous one's effect.

Level-triggered (DESIGN.md): on activation, after every change (metadata applied,
gossip event, broker request) and every ``tick_s`` the whole liveness view is
reconciled against the metadata by :func:`dlog.broker.reconcile.reconcile`.

Liveness of a broker = alive in gossip (or not seen by gossip yet, during a grace
period after activation, so a fresh controller does not fence brokers its gossip has
not met) and its Raft session not lapsed (it acknowledged this leader's heartbeats
within ``broker_session_timeout_ms``; the clock starts at activation).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from dlog.broker.config import BrokerConfig
from dlog.broker.metadata import MetadataDelta, MetadataImage
from dlog.broker.placement import assign_replicas
from dlog.broker.reconcile import Liveness, move_leaderships_off, reconcile
from dlog.broker.records import (
    AlterConfigs,
    CreatePartitions,
    CreateTopic,
    DeleteTopic,
    PartitionChange,
    Record,
    RegisterBroker,
    UnregisterBroker,
    encode_batch,
)
from dlog.broker.topic_config import TopicConfig, validate_topic_configs
from dlog.errors import (
    BrokerIdNotRegisteredError,
    DlogError,
    FencedLeaderEpochError,
    InconsistentClusterIdError,
    InvalidConfigError,
    InvalidPartitionsError,
    InvalidReplicationFactorError,
    InvalidRequestError,
    InvalidTopicError,
    InvalidUpdateVersionError,
    NotControllerError,
    NotLeaderError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from dlog.net.address import parse_address
from dlog.net.protocol import (
    AlterPartitionRequest,
    AlterPartitionResponse,
    AlterTopicRequest,
    AlterTopicResponse,
    BrokerRegistrationRequest,
    BrokerRegistrationResponse,
    ControlledShutdownRequest,
    ControlledShutdownResponse,
    CreateTopicsRequest,
    CreateTopicsResponse,
    DeleteTopicsRequest,
    DeleteTopicsResponse,
    NewTopic,
    RemoveNodeRequest,
    RemoveNodeResponse,
    TopicResult,
)

log = logging.getLogger(__name__)

TOPIC_NAME = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")
INTERNAL_TOPICS = frozenset({"__consumer_offsets"})
#: A Raft membership change not applied after this long is logged (and waited for again).
MEMBERSHIP_CHANGE_WARN_S = 30.0
#: New partitions one request may create (Kafka's limit, KAFKA-17870 / KAFKA-19673): a
#: count is an i64 on the wire, and the controller assigns and proposes every
#: partition at once, holding its lock.
MAX_PARTITIONS_PER_REQUEST = 10_000


def _check_new_partitions(count: int) -> None:
    if count > MAX_PARTITIONS_PER_REQUEST:
        raise InvalidPartitionsError(
            f"{count} new partitions in one request; at most {MAX_PARTITIONS_PER_REQUEST}"
        )


def validate_topic_name(name: str) -> None:
    if not TOPIC_NAME.match(name) or name in (".", ".."):
        raise InvalidTopicError(
            f"invalid topic name {name!r}: use 1-249 characters from [a-zA-Z0-9._-]"
        )


def _validate_registration(req: BrokerRegistrationRequest) -> None:
    """A registration must name a broker others can reach: the controller adds it to
    the Raft quorum at its raft address, and brokers and clients connect to its rpc."""
    if req.node_id < 0:
        raise InvalidRequestError(f"node id {req.node_id}: node ids are >= 0")
    if not req.directory_id or not req.incarnation:
        raise InvalidRequestError(f"broker {req.node_id}: no directory id or incarnation")
    for key, address in (("rpc", req.rpc), ("gossip", req.gossip), ("raft", req.raft)):
        try:
            _, port = parse_address(address)
        except InvalidConfigError as exc:
            raise InvalidRequestError(f"broker {req.node_id}: {key} {exc.message}") from None
        if port == 0:
            raise InvalidRequestError(
                f"broker {req.node_id}: {key} address {address!r} has no port"
            )


@dataclass(frozen=True, slots=True)
class QuorumMember:
    node_id: int
    directory_id: str
    address: str
    voter: bool


@dataclass(frozen=True, slots=True)
class FollowerProgress:
    match_index: int
    #: trio.current_time() of the follower's last response to this leader.
    last_ack: float


class MetadataQuorum(Protocol):
    """What the controller needs from the metadata Raft (the Broker adapts RaftNode)."""

    def commit_index(self) -> int: ...

    def follower_progress(self) -> dict[int, FollowerProgress]: ...

    def members(self) -> list[QuorumMember]: ...

    async def propose(self, data: bytes) -> MetadataDelta: ...

    async def add_learner(self, node_id: int, directory_id: str, address: str) -> None: ...

    async def promote(self, node_id: int, directory_id: str) -> None: ...

    async def remove_member(self, node_id: int, directory_id: str) -> None: ...

    async def step_down(self) -> None:
        """Hand leadership (and so control) to another voter, if possible."""
        ...


@dataclass(frozen=True, slots=True)
class GossipView:
    #: Node ids gossip currently considers alive (alive or suspect).
    alive: frozenset[int]
    #: Node ids gossip has declared dead or that left.
    dead: frozenset[int]


class Controller:
    def __init__(
        self,
        config: BrokerConfig,
        quorum: MetadataQuorum,
        image: Callable[[], MetadataImage],
        gossip: Callable[[], GossipView],
        cluster_id: str,
        *,
        tick_s: float = 0.2,
    ) -> None:
        self.config = config
        self.node_id = config.node_id
        self.quorum = quorum
        self._image = image
        self._gossip = gossip
        self.cluster_id = cluster_id
        self.tick_s = tick_s
        self._lock = trio.Lock()
        self._wake = trio.Event()
        self._membership_wake = trio.Event()
        self._activated_at = 0.0
        self._active = False
        #: node id -> incarnation of brokers in a controlled shutdown.
        self._shutting_down: dict[int, str] = {}
        self._last_rebalance = 0.0

    @property
    def active(self) -> bool:
        return self._active

    def wake(self) -> None:
        """Something changed (metadata applied, gossip event): reconcile soon."""
        self._wake.set()
        self._membership_wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._activated_at = trio.current_time()
        self._last_rebalance = self._activated_at
        self._active = True
        log.info("controller active on node %d", self.node_id)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reconcile_loop)
                nursery.start_soon(self._membership_loop)
                task_status.started()
        finally:
            self._active = False
            log.info("controller inactive on node %d", self.node_id)

    # --- liveness and reconcile ---------------------------------------------------------

    def liveness(self) -> Liveness:
        now = trio.current_time()
        session_s = self.config.broker_session_timeout_ms / 1000
        grace_over = now - self._activated_at > session_s
        view = self._gossip()
        progress = self.quorum.follower_progress()
        commit = self.quorum.commit_index()
        image = self._image()
        live: set[int] = set()
        caught_up: set[int] = set()
        for node, broker in image.brokers.items():
            if node == self.node_id:
                live.add(node)
                caught_up.add(node)
                continue
            in_gossip = node in view.alive
            if node in view.dead or (not in_gossip and grace_over):
                continue
            pr = progress.get(node)
            last_ack = pr.last_ack if pr is not None else -1e18
            if now - max(last_ack, self._activated_at) > session_s:
                continue
            live.add(node)
            if pr is not None and pr.match_index >= commit:
                caught_up.add(node)
            shut = self._shutting_down.get(node)
            if shut is not None and shut != broker.incarnation:
                del self._shutting_down[node]  # it restarted
        return Liveness(
            live=frozenset(live),
            caught_up=frozenset(caught_up),
            shutting_down=frozenset(self._shutting_down),
        )

    async def _reconcile_loop(self) -> None:
        while True:
            with trio.move_on_after(self.tick_s):
                await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self.reconcile_once()
            except DlogError as exc:
                log.warning("controller reconcile failed: %s", exc)

    async def _membership_loop(self) -> None:
        """Raft membership follows the registered brokers, in a loop of its own: a
        change waits until Raft applies it, and that must never hold up fencing and
        failover (:meth:`_reconcile_loop`), least of all when a member is down."""
        while True:
            with trio.move_on_after(self.tick_s):
                await self._membership_wake.wait()
            self._membership_wake = trio.Event()
            try:
                with trio.move_on_after(MEMBERSHIP_CHANGE_WARN_S) as waited:
                    await self._manage_membership()
                if waited.cancelled_caught:
                    # Still pending in Raft: the next pass finds it in progress and
                    # waits for it again.
                    log.warning(
                        "a Raft membership change is not applied after %.0f s",
                        MEMBERSHIP_CHANGE_WARN_S,
                    )
            except DlogError as exc:
                log.warning("controller membership change failed: %s", exc)

    async def reconcile_once(self) -> None:
        async with self._lock:
            image = self._image()
            now = trio.current_time()
            interval = self.config.leader_rebalance_interval_ms / 1000
            rebalance = interval > 0 and now - self._last_rebalance >= interval
            if rebalance:
                self._last_rebalance = now
            records = reconcile(
                image,
                self.liveness(),
                unclean_allowed=lambda topic: (
                    self._topic_config(image, topic).unclean_leader_election
                ),
                rebalance_preferred=rebalance,
            )
            if records:
                log.info("controller proposes %d liveness record(s)", len(records))
                await self._propose(records)

    def _topic_config(self, image: MetadataImage, topic: str) -> TopicConfig:
        info = image.topics.get(topic)
        if info is None:
            return TopicConfig.resolve({}, 1, self.config.topic_defaults)
        rf = len(info.partitions[0].replicas) if info.partitions else 1
        return TopicConfig.resolve(info.configs, rf, self.config.topic_defaults)

    async def _propose(self, records: list[Record]) -> MetadataDelta:
        return await self.quorum.propose(encode_batch(records))

    async def _manage_membership(self) -> None:
        """Registered, live brokers join the Raft quorum: learners first, then voters up
        to ``max_voters``. A member whose directory id no longer matches the broker's
        registration (its disk was wiped) is removed first, so it cannot vote as its
        old self.

        Liveness includes a Raft session (acks of this leader's heartbeats), which only
        a member can have: a broker that is not a member yet is added once gossip has
        it alive, or it could never join after the activation grace period (a learner
        neither votes nor counts toward a quorum; from then on its session counts)."""
        image = self._image()
        liveness = self.liveness()
        view = self._gossip()
        members = {m.node_id: m for m in self.quorum.members()}
        voters = sum(1 for m in members.values() if m.voter)
        for node, broker in sorted(image.brokers.items()):
            member = members.get(node)
            if member is not None and member.directory_id != broker.directory_id:
                if member.voter and voters <= 1:
                    continue
                log.info("node %d has a new directory: removing its old Raft identity", node)
                await self.quorum.remove_member(node, member.directory_id)
                return  # one change at a time
            if member is None:
                if node not in liveness.live and (node not in view.alive or node in view.dead):
                    continue
                log.info("adding node %d as a Raft learner", node)
                await self.quorum.add_learner(node, broker.directory_id, broker.raft)
                return
            if node not in liveness.live:
                continue
            if not member.voter and voters < self.config.max_voters and node in liveness.caught_up:
                log.info("promoting node %d to Raft voter", node)
                await self.quorum.promote(node, broker.directory_id)
                return

    # --- broker requests ----------------------------------------------------------------------

    async def register_broker(self, req: BrokerRegistrationRequest) -> BrokerRegistrationResponse:
        _validate_registration(req)
        if req.cluster_id != self.cluster_id:
            raise InconsistentClusterIdError(
                f"broker {req.node_id} belongs to cluster {req.cluster_id}, not {self.cluster_id}"
            )
        async with self._lock:
            image = self._image()
            if req.directory_id in image.removed_directories:
                raise BrokerIdNotRegisteredError(
                    f"node {req.node_id} was removed from the cluster for good; wipe its "
                    "data directory to bring it back as a new member"
                )
            old = image.brokers.get(req.node_id)
            record = RegisterBroker(
                node_id=req.node_id,
                directory_id=req.directory_id,
                incarnation=req.incarnation,
                rpc=req.rpc,
                gossip=req.gossip,
                raft=req.raft,
            )
            if old is None or (
                old.directory_id,
                old.incarnation,
                old.rpc,
                old.gossip,
                old.raft,
            ) != (req.directory_id, req.incarnation, req.rpc, req.gossip, req.raft):
                log.info("registering broker %d (incarnation %s)", req.node_id, req.incarnation)
                await self._propose([record])
        self.wake()
        return BrokerRegistrationResponse(metadata_index=self._image().applied_index)

    async def alter_partition(self, req: AlterPartitionRequest) -> AlterPartitionResponse:
        async with self._lock:
            image = self._image()
            topic = image.topics_by_id.get(req.topic_id)
            if topic is None or not 0 <= req.partition < len(topic.partitions):
                raise UnknownTopicOrPartitionError(f"no partition {req.topic_id}/{req.partition}")
            p = topic.partitions[req.partition]
            if p.leader != req.broker_id:
                raise NotLeaderError(
                    f"broker {req.broker_id} does not lead {p.topic}-{p.partition}",
                    leader=p.leader,
                    leader_epoch=p.leader_epoch,
                )
            if req.leader_epoch != p.leader_epoch:
                raise FencedLeaderEpochError(
                    f"leader epoch {req.leader_epoch} is not current ({p.leader_epoch})"
                )
            if req.partition_epoch != p.partition_epoch:
                raise InvalidUpdateVersionError(
                    f"partition epoch {req.partition_epoch} is not current ({p.partition_epoch})"
                )
            new_isr = list(dict.fromkeys(req.new_isr))
            if req.broker_id not in new_isr:
                raise InvalidRequestError("the leader must stay in the ISR")
            usable = set(image.unfenced_brokers())
            for node in new_isr:
                if node not in p.replicas:
                    raise InvalidRequestError(f"broker {node} is not a replica")
                if node not in p.isr and (node not in usable or node in self._shutting_down):
                    raise InvalidRequestError(f"broker {node} is fenced; it cannot join the ISR")
            delta = await self._propose(
                [
                    PartitionChange(
                        topic_id=p.topic_id,
                        partition=p.partition,
                        partition_epoch=p.partition_epoch,
                        leader=p.leader,
                        isr=new_isr,
                    )
                ]
            )
            if delta.skipped:
                raise InvalidUpdateVersionError(f"ISR change refused: {delta.skipped[0]}")
            q = self._image().partition(p.topic, p.partition)
            assert q is not None
        self.wake()
        return AlterPartitionResponse(
            leader=q.leader,
            leader_epoch=q.leader_epoch,
            partition_epoch=q.partition_epoch,
            isr=list(q.isr),
        )

    async def controlled_shutdown(
        self, req: ControlledShutdownRequest
    ) -> ControlledShutdownResponse:
        async with self._lock:
            image = self._image()
            broker = image.brokers.get(req.broker_id)
            if broker is None:
                raise BrokerIdNotRegisteredError(f"broker {req.broker_id} is not registered")
            self._shutting_down[req.broker_id] = req.incarnation
            usable = [b for b in image.unfenced_brokers() if b not in self._shutting_down]
            changes, stuck = move_leaderships_off(image, req.broker_id, usable)
            if changes:
                await self._propose(list(changes))
        log.info(
            "controlled shutdown of broker %d: moved %d partition(s), %d stuck",
            req.broker_id,
            len(changes),
            stuck,
        )
        self.wake()
        return ControlledShutdownResponse(remaining_leaderships=stuck)

    # --- admin ----------------------------------------------------------------------------------

    def _usable(self, image: MetadataImage) -> list[int]:
        live = self.liveness().live
        return [b for b in image.unfenced_brokers() if b in live and b not in self._shutting_down]

    async def create_topics(self, req: CreateTopicsRequest) -> CreateTopicsResponse:
        try:
            _check_new_partitions(sum(max(0, topic.partitions) for topic in req.topics))
        except InvalidPartitionsError as exc:
            return CreateTopicsResponse(
                topics=[
                    TopicResult(name=t.name, error_code=int(exc.code), error_message=exc.message)
                    for t in req.topics
                ]
            )
        results = []
        for topic in req.topics:
            try:
                topic_id = await self.create_topic(
                    topic, validate_only=req.validate_only, internal=topic.name in INTERNAL_TOPICS
                )
                results.append(TopicResult(name=topic.name, topic_id=topic_id))
            except DlogError as exc:
                results.append(
                    TopicResult(
                        name=topic.name, error_code=int(exc.code), error_message=exc.message
                    )
                )
        return CreateTopicsResponse(topics=results)

    async def create_topic(
        self, topic: NewTopic, *, validate_only: bool = False, internal: bool = False
    ) -> str:
        validate_topic_name(topic.name)
        if topic.partitions < 1:
            raise InvalidPartitionsError(f"partitions must be >= 1, got {topic.partitions}")
        _check_new_partitions(topic.partitions)
        configs = validate_topic_configs(topic.configs)
        async with self._lock:
            image = self._image()
            if topic.name in image.topics:
                raise TopicAlreadyExistsError(f"topic {topic.name!r} already exists")
            usable = self._usable(image)
            rf = topic.replication_factor
            if rf is None:
                rf = self.config.default_replication_factor or min(3, len(usable))
            if rf < 1:
                raise InvalidReplicationFactorError(
                    "replication factor must be >= 1" if usable else "no live brokers"
                )
            min_isr = TopicConfig.resolve(
                {k: v for k, v in configs.items() if v is not None}, rf, self.config.topic_defaults
            ).min_insync_replicas
            if min_isr > rf:
                raise InvalidConfigError(
                    f"min_insync_replicas={min_isr} exceeds the replication factor {rf}"
                )
            assignments = assign_replicas(
                0, topic.partitions, rf, usable, image.leader_counts(), image.replica_counts()
            )
            topic_id = uuid.uuid4().hex
            if validate_only:
                return topic_id
            delta = await self._propose(
                [
                    CreateTopic(
                        name=topic.name,
                        topic_id=topic_id,
                        configs={k: v for k, v in configs.items() if v is not None},
                        partitions=assignments,
                        internal=internal,
                    )
                ]
            )
            if delta.skipped:
                raise TopicAlreadyExistsError(f"topic {topic.name!r} already exists")
        log.info("created topic %s (%d partitions, RF %d)", topic.name, topic.partitions, rf)
        return topic_id

    async def delete_topics(self, req: DeleteTopicsRequest) -> DeleteTopicsResponse:
        results = []
        for name in req.topics:
            try:
                async with self._lock:
                    info = self._image().topics.get(name)
                    if info is None:
                        raise UnknownTopicOrPartitionError(f"topic {name!r} does not exist")
                    if info.internal:
                        raise InvalidTopicError(f"{name} is an internal topic")
                    await self._propose([DeleteTopic(topic_id=info.topic_id)])
                results.append(TopicResult(name=name, topic_id=info.topic_id))
                log.info("deleted topic %s", name)
            except DlogError as exc:
                results.append(
                    TopicResult(name=name, error_code=int(exc.code), error_message=exc.message)
                )
        return DeleteTopicsResponse(topics=results)

    async def alter_topic(self, req: AlterTopicRequest) -> AlterTopicResponse:
        configs = validate_topic_configs(req.configs)
        async with self._lock:
            image = self._image()
            info = image.topics.get(req.name)
            if info is None:
                raise UnknownTopicOrPartitionError(f"topic {req.name!r} does not exist")
            records: list[Record] = []
            if req.partitions is not None and req.partitions == len(info.partitions):
                if not configs:
                    raise InvalidPartitionsError(
                        f"topic {req.name!r} already has {req.partitions} partitions"
                    )
            elif req.partitions is not None:
                if info.internal:
                    # The offsets coordinator maps a group to partition
                    # crc32(group) % count: a new count strands every group's commits.
                    raise InvalidPartitionsError(
                        f"cannot change the partition count of internal topic {req.name!r}"
                    )
                if req.partitions < len(info.partitions):
                    raise InvalidPartitionsError(
                        f"topic {req.name!r} has {len(info.partitions)} partitions; "
                        "partitions can only be added"
                    )
                _check_new_partitions(req.partitions - len(info.partitions))
                rf = len(info.partitions[0].replicas)
                assignments = assign_replicas(
                    len(info.partitions),
                    req.partitions - len(info.partitions),
                    rf,
                    self._usable(image),
                    image.leader_counts(),
                    image.replica_counts(),
                )
                records.append(CreatePartitions(topic_id=info.topic_id, partitions=assignments))
            if configs:
                merged = {**info.configs, **{k: v for k, v in configs.items() if v is not None}}
                for k, v in configs.items():
                    if v is None:
                        merged.pop(k, None)
                rf = len(info.partitions[0].replicas) if info.partitions else 1
                min_isr = TopicConfig.resolve(merged, rf, self.config.topic_defaults)
                if min_isr.min_insync_replicas > rf:
                    raise InvalidConfigError(
                        f"min_insync_replicas={min_isr.min_insync_replicas} exceeds the "
                        f"replication factor {rf}"
                    )
                records.append(AlterConfigs(topic_id=info.topic_id, configs=configs))
            if records and not req.validate_only:
                await self._propose(records)
        return AlterTopicResponse(topic=TopicResult(name=req.name, topic_id=info.topic_id))

    async def remove_node(self, req: RemoveNodeRequest) -> RemoveNodeResponse:
        async with self._lock:
            image = self._image()
            members = {m.node_id: m for m in self.quorum.members()}
            member = members.get(req.node_id)
            if member is None and req.node_id not in image.brokers:
                raise BrokerIdNotRegisteredError(f"node {req.node_id} is not in the cluster")
            if member is not None and member.voter and sum(m.voter for m in members.values()) <= 1:
                raise InvalidRequestError("cannot remove the last Raft voter")
            if req.node_id == self.node_id:
                # This node would stop half-way through its own removal: hand control to
                # another voter, which the client's retry then reaches.
                await self.quorum.step_down()
                raise NotControllerError(
                    f"node {req.node_id} is the controller; control moved to another voter"
                )
            # The registry first, while the node still gets the metadata: it then sees
            # itself unregistered, is refused when it registers again, and stops.
            if req.node_id in image.brokers:
                await self._propose([UnregisterBroker(node_id=req.node_id)])
            if member is not None:
                await self.quorum.remove_member(req.node_id, member.directory_id)
        log.info("removed node %d from the cluster", req.node_id)
        self.wake()
        return RemoveNodeResponse()
