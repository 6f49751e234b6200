"""The RPC handler table of a broker: every protocol operation, answered or forwarded.

Data-plane operations go to the ReplicaManager, offsets to the GroupCoordinator, and
controller operations either to the local Controller (when this node is it) or are
forwarded to the current controller, so any broker answers any request.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from dlog.broker.controller import Controller
from dlog.broker.metadata import MetadataImage, PartitionInfo
from dlog.broker.offsets import OFFSETS_TOPIC, coordinator_partition
from dlog.errors import (
    CoordinatorNotAvailableError,
    DlogError,
    InvalidRequestError,
    NetworkError,
    NotControllerError,
    RequestTimedOutError,
)
from dlog.net.messages import Message
from dlog.net.protocol import (
    BrokerInfo,
    ClusterStatusRequest,
    ClusterStatusResponse,
    CreateTopicsRequest,
    DescribeClusterRequest,
    DescribeClusterResponse,
    FindCoordinatorRequest,
    FindCoordinatorResponse,
    GroupOffsets,
    MetadataRequest,
    MetadataResponse,
    NewTopic,
    PartitionMetadata,
    RaftMember,
    ReplicaStatusRequest,
    ReplicaStatusResponse,
    TopicMetadata,
)
from dlog.net.server import Handler, Route

if TYPE_CHECKING:
    from dlog.broker.node import Broker

log = logging.getLogger(__name__)


def partition_metadata(p: PartitionInfo) -> PartitionMetadata:
    return PartitionMetadata(
        partition=p.partition,
        leader=p.leader,
        leader_epoch=p.leader_epoch,
        replicas=list(p.replicas),
        isr=list(p.isr),
        partition_epoch=p.partition_epoch,
    )


class BrokerHandlers:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def routes(self) -> dict[str, Handler | Route]:
        b = self.broker
        rm = b.replicas
        return {
            "metadata": Route(self.metadata, inline=True),
            "produce": Route(rm.produce, inline=True),
            "fetch": Route(rm.fetch, inline=True),
            "list_offsets": Route(rm.list_offsets, inline=True),
            "offsets_for_leader_epoch": Route(rm.offsets_for_leader_epoch, inline=True),
            "replica_status": Route(self.replica_status, inline=True),
            "cluster_status": self.cluster_status,
            "describe_cluster": Route(self.describe_cluster, inline=True),
            "create_topics": self._controller_op(Controller.create_topics),
            "delete_topics": self._controller_op(Controller.delete_topics),
            "alter_topic": self._controller_op(Controller.alter_topic),
            "remove_node": self._controller_op(Controller.remove_node),
            "broker_registration": self._controller_op(Controller.register_broker, forward=False),
            "alter_partition": self._controller_op(Controller.alter_partition, forward=False),
            "controlled_shutdown": self._controller_op(
                Controller.controlled_shutdown, forward=False
            ),
            "find_coordinator": self.find_coordinator,
            "offset_commit": b.coordinator.commit,
            "offset_fetch": b.coordinator.fetch,
        }

    # --- controller operations -------------------------------------------------------

    def _controller_op(self, method: Any, *, forward: bool = True) -> Handler:
        async def handle(request: Message) -> Message:
            controller = self.broker.controller
            if controller is not None and controller.active:
                result: Message = await method(controller, request)
                return result
            if not forward:
                raise NotControllerError(
                    f"node {self.broker.node_id} is not the controller",
                    controller=self.broker.controller_id(),
                )
            return await self.broker.call_controller(request)

        return handle

    # --- metadata ----------------------------------------------------------------------

    def _brokers(self, image: MetadataImage) -> list[BrokerInfo]:
        alive = self.broker.gossip_view().alive
        return [
            BrokerInfo(
                node_id=b.node_id,
                rpc=b.rpc,
                gossip=b.gossip,
                raft=b.raft,
                fenced=b.fenced,
                alive=b.node_id in alive,
            )
            for b in sorted(image.brokers.values(), key=lambda b: b.node_id)
        ]

    def _topics(self, image: MetadataImage, names: list[str] | None) -> list[TopicMetadata]:
        out = []
        wanted = sorted(image.topics) if names is None else names
        for name in wanted:
            topic = image.topics.get(name)
            if topic is None:
                out.append(
                    TopicMetadata(
                        name=name,
                        error_code=3,  # UNKNOWN_TOPIC_OR_PARTITION
                        error_message=f"topic {name!r} does not exist",
                    )
                )
                continue
            out.append(
                TopicMetadata(
                    name=name,
                    topic_id=topic.topic_id,
                    partitions=[partition_metadata(p) for p in topic.partitions],
                    configs=dict(topic.configs),
                    internal=topic.internal,
                )
            )
        return out

    async def metadata(self, request: MetadataRequest) -> MetadataResponse:
        image = self.broker.image
        return MetadataResponse(
            cluster_id=self.broker.cluster_id,
            controller=self.broker.controller_id(),
            brokers=self._brokers(image),
            topics=self._topics(image, request.topics),
            metadata_index=image.applied_index,
        )

    async def describe_cluster(self, request: DescribeClusterRequest) -> DescribeClusterResponse:
        image = self.broker.image
        return DescribeClusterResponse(
            cluster_id=self.broker.cluster_id,
            controller=self.broker.controller_id(),
            brokers=self._brokers(image),
            raft_members=[
                RaftMember(
                    node_id=m.node_id,
                    directory_id=m.directory_id,
                    address=m.address,
                    role="voter" if m.voter else "learner",
                )
                for m in self.broker.quorum_members()
            ],
            metadata_index=image.applied_index,
        )

    async def replica_status(self, request: ReplicaStatusRequest) -> ReplicaStatusResponse:
        base = await self.broker.replicas.replica_status(request)
        groups = [
            GroupOffsets(group=g, topic=t, partition=p, offset=o)
            for g, t, p, o in self.broker.coordinator.all_offsets()
            if request.topics is None or t in request.topics
        ]
        return ReplicaStatusResponse(
            node_id=base.node_id, partitions=base.partitions, group_offsets=groups
        )

    async def cluster_status(self, request: ClusterStatusRequest) -> ClusterStatusResponse:
        """Gather every broker's replica state (``dlogctl top`` reads this)."""
        image = self.broker.image
        replies: dict[int, ReplicaStatusResponse] = {}
        unreachable: list[int] = []

        async def ask(node: int, address: str) -> None:
            try:
                if node == self.broker.node_id:
                    reply: Message = await self.replica_status(ReplicaStatusRequest())
                else:
                    reply = await self.broker.pool.call(address, ReplicaStatusRequest(), timeout=2)
                assert isinstance(reply, ReplicaStatusResponse)
                replies[node] = reply
            except (DlogError, AssertionError):
                unreachable.append(node)

        async with trio.open_nursery() as nursery:
            for broker in image.brokers.values():
                nursery.start_soon(ask, broker.node_id, broker.rpc)
        roles = {
            str(m.node_id): "voter" if m.voter else "learner" for m in self.broker.quorum_members()
        }
        group_offsets = [g for r in replies.values() for g in r.group_offsets]
        return ClusterStatusResponse(
            cluster_id=self.broker.cluster_id,
            answered_by=self.broker.node_id,
            controller=self.broker.controller_id(),
            metadata_index=image.applied_index,
            brokers=self._brokers(image),
            raft_roles=roles,
            topics=self._topics(image, None),
            replicas=[replies[n] for n in sorted(replies)],
            unreachable=sorted(unreachable),
            group_offsets=sorted(group_offsets, key=lambda g: (g.group, g.topic, g.partition)),
        )

    # --- consumer groups ------------------------------------------------------------------

    async def find_coordinator(self, request: FindCoordinatorRequest) -> FindCoordinatorResponse:
        if not request.group:
            raise InvalidRequestError("group must not be empty")
        image = self.broker.image
        topic = image.topics.get(OFFSETS_TOPIC)
        if topic is None:
            await self._create_offsets_topic()
            raise CoordinatorNotAvailableError(f"creating {OFFSETS_TOPIC}; retry")
        p = topic.partitions[coordinator_partition(request.group, len(topic.partitions))]
        if p.leader is None or p.leader not in image.brokers:
            raise CoordinatorNotAvailableError(
                f"partition {p.partition} of {OFFSETS_TOPIC} has no leader"
            )
        return FindCoordinatorResponse(node_id=p.leader, rpc=image.brokers[p.leader].rpc)

    async def _create_offsets_topic(self) -> None:
        live = len(self.broker.image.unfenced_brokers())
        request = CreateTopicsRequest(
            topics=[
                NewTopic(
                    name=OFFSETS_TOPIC,
                    partitions=self.broker.config.offsets_topic_partitions,
                    replication_factor=max(1, min(3, live)),
                )
            ]
        )
        try:
            controller = self.broker.controller
            if controller is not None and controller.active:
                await controller.create_topics(request)
            else:
                await self.broker.call_controller(request)
        except (NetworkError, RequestTimedOutError, NotControllerError) as exc:
            log.info("could not create %s yet: %s", OFFSETS_TOPIC, exc)
