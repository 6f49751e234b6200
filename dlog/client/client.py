"""``dlog.connect``: the client, its admin calls, and the producers and consumers it makes.

Ownership: :func:`connect` is an async context manager that owns an RPC pool (unless
given one) and a nursery running the metadata cache's refresh task; producers and
consumers made with :meth:`Client.producer` / :meth:`Client.consumer` own their own
tasks and must be closed before the client (nest the ``async with`` blocks).
Leaving ``connect`` cancels the refresh task and closes every connection.

Admin calls go to any broker (brokers forward controller operations) and retry
retriable errors until ``default_api_timeout_ms``; failures raise the
:mod:`dlog.errors` exception of the broker's error code with one clear message
(``TopicAlreadyExistsError: topic 'orders' already exists``). A call cancelled (or
timed out by the caller) after its request left may still take effect; a create or
delete retried after a lost answer can then report TOPIC_ALREADY_EXISTS or
UNKNOWN_TOPIC_OR_PARTITION for what it did itself.

An exception raised inside any of the ``async with`` blocks comes back to the caller
as itself, not wrapped in an ExceptionGroup by the nurseries involved.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

import trio

from dlog.client.admin import (
    BrokerDescription,
    ClusterDescription,
    ListedOffset,
    PartitionDescription,
    RaftMemberDescription,
    TopicDescription,
    TopicListing,
)
from dlog.client.backoff import Backoff
from dlog.client.config import ClientOptions, ConsumerConfig, ProducerConfig
from dlog.client.consumer import Consumer
from dlog.client.metadata import ClusterView, MetadataCache
from dlog.client.producer import Producer
from dlog.client.routing import Router
from dlog.clock import SystemClock, WallClock
from dlog.errors import (
    ERRORS,
    BrokerIdNotRegisteredError,
    DlogError,
    ErrorCode,
    InvalidConfigError,
    LeaderNotAvailableError,
    UnknownTopicOrPartitionError,
    error_from_wire,
)
from dlog.net.address import parse_address
from dlog.net.client import ClientConfig, RpcPool, open_rpc_pool
from dlog.net.messages import Message
from dlog.net.protocol import (
    EARLIEST_TIMESTAMP,
    LATEST_TIMESTAMP,
    AlterTopicRequest,
    AlterTopicResponse,
    ClusterStatusRequest,
    ClusterStatusResponse,
    CreateTopicsRequest,
    CreateTopicsResponse,
    DeleteTopicsRequest,
    DeleteTopicsResponse,
    DescribeClusterRequest,
    DescribeClusterResponse,
    MetadataRequest,
    MetadataResponse,
    NewTopic,
    PartitionState,
    RemoveNodeRequest,
    RemoveNodeResponse,
    ReplicaStatusRequest,
    ReplicaStatusResponse,
    TopicResult,
)

_R = TypeVar("_R", bound=Message)
_C = TypeVar("_C")


def parse_bootstrap(bootstrap: str | Sequence[str]) -> list[str]:
    """``"h1:p1,h2:p2"`` or a list of ``host:port`` as normalized addresses."""
    items = bootstrap.split(",") if isinstance(bootstrap, str) else list(bootstrap)
    addresses = [item.strip() for item in items if item.strip()]
    if not addresses:
        raise InvalidConfigError("bootstrap needs at least one HOST:PORT address")
    for address in addresses:
        parse_address(address)
    return addresses


def _build(cls: Callable[..., _C], what: str, options: Mapping[str, Any]) -> _C:
    try:
        return cls(**options)
    except TypeError as exc:
        raise InvalidConfigError(f"bad {what} option: {exc}") from None


def _config_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class Client:
    """A connection to a dlog cluster. Make one with :func:`connect`."""

    def __init__(
        self,
        pool: RpcPool,
        bootstrap: list[str],
        options: ClientOptions,
        *,
        clock: WallClock,
        rng: random.Random,
    ) -> None:
        self.options = options
        self._pool = pool
        self._clock = clock
        self._rng = rng
        self._metadata = MetadataCache(pool, bootstrap, options, rng)
        self._router = Router(pool, self._metadata, options, rng)

    @property
    def cluster(self) -> ClusterView:
        """The latest metadata snapshot (no I/O)."""
        return self._metadata.view

    @property
    def metadata(self) -> MetadataCache:
        return self._metadata

    async def refresh_metadata(self) -> ClusterView:
        """Fetch metadata now and return the new snapshot."""
        return await self._metadata.refresh()

    # --- producers and consumers -----------------------------------------------------

    @asynccontextmanager
    async def producer(self, **options: Any) -> AsyncIterator[Producer]:
        """A :class:`Producer` with :class:`~dlog.client.config.ProducerConfig` options
        (``acks``, ``batch_size``, ``linger_ms``, ``delivery_timeout_ms`` ...).

        Leaving the block normally flushes (waits for every record's outcome, at most
        ``delivery_timeout_ms``); leaving it by an exception or cancellation fails the
        records not yet acknowledged with ``trio.ClosedResourceError``.
        """
        config = _build(ProducerConfig, "producer", options)
        producer = Producer(
            self._pool,
            self._metadata,
            config,
            options=self.options,
            clock=self._clock,
            rng=self._rng,
        )
        body_error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            await nursery.start(producer.run)
            try:
                yield producer
            except BaseException as exc:
                body_error = exc
                nursery.cancel_scope.cancel()
            else:
                await producer.aclose()
        if body_error is not None:
            raise body_error  # outside the nursery: not wrapped in an ExceptionGroup

    @asynccontextmanager
    async def consumer(
        self,
        topic: str,
        *,
        group: str | None = None,
        partitions: Iterable[int] | int | None = None,
        from_beginning: bool = False,
        **options: Any,
    ) -> AsyncIterator[Consumer]:
        """A :class:`Consumer` of ``topic`` (all partitions, or ``partitions``), with
        :class:`~dlog.client.config.ConsumerConfig` options (``auto_offset_reset``,
        ``max_wait_ms``, ``auto_commit_interval_ms`` ...).

        Entering looks up the topic and every partition's start position (the group's
        committed offset, else earliest with ``from_beginning``, else latest). Leaving
        stops fetching; with ``auto_commit_interval_ms`` a normal exit commits first.
        """
        if isinstance(partitions, int):
            partitions = (partitions,)
        config = _build(
            ConsumerConfig,
            "consumer",
            {
                "group": group,
                "partitions": None if partitions is None else tuple(partitions),
                "from_beginning": from_beginning,
                **options,
            },
        )
        consumer = Consumer(
            self._pool,
            self._metadata,
            self._router,
            topic,
            config,
            options=self.options,
            rng=self._rng,
        )
        await consumer.start()
        body_error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            await nursery.start(consumer.run)
            try:
                yield consumer
            except BaseException as exc:
                body_error = exc
            else:
                if config.auto_commit_interval_ms is not None:
                    await consumer.commit()
            nursery.cancel_scope.cancel()
        if body_error is not None:
            raise body_error  # outside the nursery: not wrapped in an ExceptionGroup

    # --- topics -------------------------------------------------------------------------

    async def create_topic(
        self,
        name: str,
        partitions: int = 1,
        replication_factor: int | None = None,
        config: Mapping[str, object] | None = None,
    ) -> str:
        """Create a topic; returns its topic id. ``replication_factor`` None: the
        cluster's default (min(3, live brokers)). Raises TopicAlreadyExistsError,
        InvalidTopicError, InvalidPartitionsError, InvalidReplicationFactorError,
        InvalidConfigError ... The topic's leaders may take a moment to be elected:
        :meth:`wait_for_topic` waits for them.
        """
        request = CreateTopicsRequest(
            topics=[
                NewTopic(
                    name=name,
                    partitions=partitions,
                    replication_factor=replication_factor,
                    configs={k: _config_text(v) for k, v in (config or {}).items()},
                )
            ]
        )
        result = await self._topic_call(
            name, request, CreateTopicsResponse, lambda r: _pick(r.topics, name)
        )
        self._metadata.request_refresh()
        return result.topic_id

    async def delete_topic(self, name: str) -> None:
        """Delete a topic. Raises UnknownTopicOrPartitionError if there is none."""
        request = DeleteTopicsRequest(topics=[name])
        await self._topic_call(name, request, DeleteTopicsResponse, lambda r: _pick(r.topics, name))
        self._metadata.request_refresh()

    async def alter_topic(
        self,
        name: str,
        partitions: int | None = None,
        config: Mapping[str, object | None] | None = None,
    ) -> None:
        """Grow the partition count to ``partitions`` and/or change configs (a None
        value resets a key to its default)."""
        request = AlterTopicRequest(
            name=name,
            partitions=partitions,
            configs={
                k: (None if v is None else _config_text(v)) for k, v in (config or {}).items()
            },
        )
        await self._topic_call(name, request, AlterTopicResponse, lambda r: r.topic)
        self._metadata.request_refresh()

    async def list_topics(self, *, include_internal: bool = False) -> list[TopicListing]:
        """Every topic, by name (internal ones like ``__consumer_offsets`` on request)."""
        response = await self._router.call_any(MetadataRequest(topics=None), MetadataResponse)
        self._metadata.merge(response, None)
        out = []
        for meta in sorted(response.topics, key=lambda t: t.name):
            if meta.error_code or (meta.internal and not include_internal):
                continue
            out.append(
                TopicListing(
                    name=meta.name,
                    topic_id=meta.topic_id,
                    partitions=len(meta.partitions),
                    replication_factor=max((len(p.replicas) for p in meta.partitions), default=0),
                    internal=meta.internal,
                    configs=dict(meta.configs),
                )
            )
        return out

    async def describe_topic(self, name: str) -> TopicDescription:
        """Partitions with leader, epoch, replicas and ISR from the metadata, and the
        high watermark and log end offset each partition's leader reports (None for a
        leader that could not be asked)."""
        response = await self._router.call_any(MetadataRequest(topics=[name]), MetadataResponse)
        self._metadata.merge(response, [name])
        meta = next((t for t in response.topics if t.name == name), None)
        if meta is None or meta.error_code:
            code = ErrorCode.UNKNOWN_TOPIC_OR_PARTITION if meta is None else meta.error_code
            message = (meta.error_message if meta is not None else "") or (
                f"topic {name!r} does not exist"
                if code == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
                else f"topic {name!r}: {_describe_code(code)}"
            )
            raise error_from_wire(code, message)
        addresses = {b.node_id: b.rpc for b in response.brokers}
        leaders = {p.leader for p in meta.partitions if p.leader is not None}
        states: dict[int, PartitionState] = {}
        timeout = self.options.request_timeout_ms / 1000

        async def ask(node: int) -> None:
            address = addresses.get(node)
            if not address:
                return
            try:
                status = await self._pool.call_typed(
                    address,
                    ReplicaStatusRequest(topics=[name]),
                    ReplicaStatusResponse,
                    timeout=timeout,
                )
            except DlogError:
                return
            for state in status.partitions:
                if state.topic == name:
                    led = next((p for p in meta.partitions if p.partition == state.partition), None)
                    if led is not None and led.leader == node:
                        states[state.partition] = state

        async with trio.open_nursery() as nursery:
            for node in sorted(leaders):
                nursery.start_soon(ask, node)
        partitions = []
        for p in sorted(meta.partitions, key=lambda p: p.partition):
            state = states.get(p.partition)
            partitions.append(
                PartitionDescription(
                    partition=p.partition,
                    leader=p.leader,
                    leader_epoch=p.leader_epoch,
                    replicas=tuple(p.replicas),
                    isr=tuple(p.isr),
                    high_watermark=None if state is None else state.high_watermark,
                    log_end_offset=None if state is None else state.log_end_offset,
                    log_start_offset=None if state is None else state.log_start_offset,
                )
            )
        return TopicDescription(
            name=meta.name,
            topic_id=meta.topic_id,
            partitions=tuple(partitions),
            configs=dict(meta.configs),
            internal=meta.internal,
        )

    async def wait_for_topic(self, name: str, timeout: float = 30.0) -> None:
        """Wait until ``name`` exists and every partition has a known leader.

        Raises UnknownTopicOrPartitionError (the topic never appeared) or
        LeaderNotAvailableError (some partition has no leader) after ``timeout`` s.
        """
        self._metadata.track(name)
        backoff = Backoff(
            self.options.retry_backoff_ms / 1000,
            self.options.retry_backoff_max_ms / 1000,
            self._rng,
        )
        with trio.move_on_after(timeout):
            while True:
                try:
                    view = await self._metadata.refresh()
                except DlogError as exc:
                    if not exc.retriable:
                        raise
                    view = self._metadata.view
                info = view.topics.get(name)
                if (
                    info is not None
                    and info.partitions
                    and all(view.address_of(p.leader) is not None for p in info.partitions)
                ):
                    return
                await trio.sleep(backoff.failed())
        view = self._metadata.view
        info = view.topics.get(name)
        if info is None:
            raise UnknownTopicOrPartitionError(
                f"topic {name!r} did not appear within {timeout:g}s", topic=name
            )
        leaderless = [p.partition for p in info.partitions if view.address_of(p.leader) is None]
        raise LeaderNotAvailableError(
            f"topic {name!r}: partitions {leaderless} have no leader after {timeout:g}s",
            topic=name,
            partitions=leaderless,
        )

    # --- offsets ------------------------------------------------------------------------

    async def list_offsets(self, topic: str, partition: int, timestamp: int) -> ListedOffset:
        """The first offset whose record timestamp is >= ``timestamp`` (ms), or with
        ``dlog.net.protocol.EARLIEST_TIMESTAMP`` / ``LATEST_TIMESTAMP`` the log start
        offset / the high watermark. Asked of the partition's leader."""
        result = (await self._router.list_offsets(topic, {partition: timestamp}))[partition]
        return ListedOffset(
            offset=None if result.offset < 0 else result.offset,
            timestamp=None if result.timestamp < 0 else result.timestamp,
        )

    async def earliest_offset(self, topic: str, partition: int) -> int:
        """The partition's log start offset."""
        result = await self._router.list_offsets(topic, {partition: EARLIEST_TIMESTAMP})
        return result[partition].offset

    async def latest_offset(self, topic: str, partition: int) -> int:
        """The partition's high watermark (the offset the next consumed record gets)."""
        result = await self._router.list_offsets(topic, {partition: LATEST_TIMESTAMP})
        return result[partition].offset

    # --- cluster --------------------------------------------------------------------------

    async def describe_cluster(self) -> ClusterDescription:
        """Brokers, Raft members, the controller and the metadata index."""
        r = await self._router.call_any(DescribeClusterRequest(), DescribeClusterResponse)
        return ClusterDescription(
            cluster_id=r.cluster_id,
            controller=r.controller,
            brokers=tuple(
                BrokerDescription(
                    node_id=b.node_id,
                    rpc=b.rpc,
                    gossip=b.gossip,
                    raft=b.raft,
                    fenced=b.fenced,
                    alive=b.alive,
                )
                for b in sorted(r.brokers, key=lambda b: b.node_id)
            ),
            raft_members=tuple(
                RaftMemberDescription(
                    node_id=m.node_id, directory_id=m.directory_id, address=m.address, role=m.role
                )
                for m in sorted(r.raft_members, key=lambda m: m.node_id)
            ),
            metadata_index=r.metadata_index,
        )

    async def cluster_status(self) -> ClusterStatusResponse:
        """Everything ``dlogctl top`` shows, gathered by the broker that answers (the
        protocol's own frozen dataclass: brokers, Raft roles, topics, every reachable
        broker's replica states, group offsets)."""
        return await self._router.call_any(ClusterStatusRequest(), ClusterStatusResponse)

    async def remove_node(self, node_id: int) -> None:
        """Remove a node from the Raft voters and the cluster for good."""
        await self._router.call_any(
            RemoveNodeRequest(node_id=node_id),
            RemoveNodeResponse,
            final=(BrokerIdNotRegisteredError,),
        )
        self._metadata.request_refresh()

    # --- internals ------------------------------------------------------------------------

    async def _topic_call(
        self,
        name: str,
        request: Message,
        response_type: type[_R],
        pick: Callable[[_R], TopicResult | None],
    ) -> TopicResult:
        """An admin call answered per topic: retries a retriable per-topic error."""
        budget = self.options.default_api_timeout_ms / 1000
        deadline = trio.current_time() + budget
        backoff = Backoff(
            self.options.retry_backoff_ms / 1000,
            self.options.retry_backoff_max_ms / 1000,
            self._rng,
        )
        while True:
            remaining = max(0.001, deadline - trio.current_time())
            response = await self._router.call_any(
                request,
                response_type,
                timeout_s=remaining,
                final=(UnknownTopicOrPartitionError,),
            )
            result = pick(response)
            if result is None:
                raise error_from_wire(
                    ErrorCode.UNKNOWN_SERVER_ERROR,
                    f"{type(response).__name__} has no result for topic {name!r}",
                )
            if not result.error_code:
                return result
            error = error_from_wire(
                result.error_code,
                result.error_message or f"topic {name!r}: {_describe_code(result.error_code)}",
            )
            delay = backoff.failed()
            # The controller answers topic operations from committed metadata: its
            # "no such topic" is final, unlike a broker's during metadata propagation.
            final = not error.retriable or isinstance(error, UnknownTopicOrPartitionError)
            if final or trio.current_time() + delay >= deadline:
                raise error
            await trio.sleep(delay)


def _pick(results: list[TopicResult], name: str) -> TopicResult | None:
    return next((r for r in results if r.name == name), None)


def _describe_code(code: int) -> str:
    try:
        return ERRORS[ErrorCode(code)].description
    except (ValueError, KeyError):
        return f"error {code}"


@asynccontextmanager
async def connect(
    bootstrap: str | Sequence[str],
    *,
    pool: RpcPool | None = None,
    clock: WallClock | None = None,
    rng: random.Random | None = None,
    **options: Any,
) -> AsyncIterator[Client]:
    """Connect to the cluster at ``bootstrap`` (``"host:port"``, comma-separated, or a
    list); ``options`` are :class:`~dlog.client.config.ClientOptions`
    (``request_timeout_ms``, ``metadata_max_age_ms``, ``default_api_timeout_ms`` ...).

    Connects lazily: the first call that needs the cluster asks a bootstrap broker for
    metadata. ``pool``: use this RPC pool (owned by the caller) instead of opening one;
    ``clock``: the wall clock for record timestamps; ``rng``: randomness (partition
    choice, backoff jitter), for reproducible tests.
    """
    opts = _build(ClientOptions, "client", options)
    addresses = parse_bootstrap(bootstrap)
    rng = rng or random.Random()
    body_error: BaseException | None = None
    async with AsyncExitStack() as stack:
        if pool is None:
            net_config = ClientConfig(
                connect_timeout_s=opts.connect_timeout_ms / 1000,
                request_timeout_s=opts.request_timeout_ms / 1000,
            )
            pool = await stack.enter_async_context(open_rpc_pool(net_config, rng=rng))
        client = Client(pool, addresses, opts, clock=clock or SystemClock(), rng=rng)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.metadata.run)
            try:
                yield client
            except BaseException as exc:
                body_error = exc
            nursery.cancel_scope.cancel()
    if body_error is not None:
        # Raised outside every nursery (ours and the pool's), so the caller gets its
        # own exception back, not wrapped in ExceptionGroups.
        raise body_error
