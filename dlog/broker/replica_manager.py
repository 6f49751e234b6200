"""The data plane of one broker: partition replicas, produce, fetch, replication.

Ownership: :meth:`ReplicaManager.run` opens a nursery holding the metadata-reaction
task, the ISR-check task, the task that expires parked requests at their deadlines,
and one fetcher task per partition this broker follows, each in its own cancel scope
so a leader change restarts exactly that fetcher. Request handlers (produce, fetch,
...) run in the RPC server's read loops or tasks and only touch partitions between
awaits. A produce waiting for replication (acks=all) and a long-polling fetch waiting
for data park without a task (Kafka's purgatory): every change of their partitions
pokes them, so the change that satisfies one answers it; stopping answers the rest.

What happens when metadata changes (:meth:`on_metadata`, called after every applied
Raft batch once the broker serves, see :meth:`start_serving`): the delta is queued and
one task applies it in order -- creating or deleting logs, making this broker leader
or follower of each changed partition, starting or stopping fetchers. Each of those
actions stands alone: one that fails (a disk error, say) is logged and tried again,
against the image of that moment, after a backoff or with the next change, and the
others go ahead meanwhile. A follower always truncates its log to the leader's epoch
history (OffsetsForLeaderEpoch) before it fetches, so replica logs never diverge.

The broker path never decodes a record: batches are validated by their headers and
copied between sockets and segments as bytes.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import trio

from dlog.broker.config import BrokerConfig
from dlog.broker.metadata import MetadataDelta, MetadataImage, PartitionInfo
from dlog.broker.partition import Partition, Role
from dlog.broker.topic_config import TopicConfig
from dlog.clock import WallClock
from dlog.errors import (
    DlogError,
    ErrorCode,
    FencedLeaderEpochError,
    InvalidRequestError,
    InvalidRequiredAcksError,
    InvalidTopicError,
    LeaderNotAvailableError,
    NetworkError,
    NotEnoughReplicasAfterAppendError,
    NotEnoughReplicasError,
    NotLeaderError,
    RequestTimedOutError,
    StorageError,
    StorageIOError,
    UnknownLeaderEpochError,
    UnknownServerError,
    UnknownTopicOrPartitionError,
    error_from_wire,
)
from dlog.net.client import RpcPool
from dlog.net.messages import Message, payload_bytes
from dlog.net.protocol import (
    ACKS_ALL,
    ACKS_LEADER,
    ACKS_NONE,
    EARLIEST_TIMESTAMP,
    LATEST_TIMESTAMP,
    NO_EPOCH,
    AlterPartitionRequest,
    AlterPartitionResponse,
    EpochEndOffset,
    EpochQuery,
    FetchPartition,
    FetchPartitionResult,
    FetchRequest,
    FetchResponse,
    ListOffsetsPartitionResult,
    ListOffsetsRequest,
    ListOffsetsResponse,
    OffsetsForLeaderEpochRequest,
    OffsetsForLeaderEpochResponse,
    PartitionState,
    ProducePartitionResult,
    ProduceRequest,
    ProduceResponse,
    ReplicaState,
    ReplicaStatusRequest,
    ReplicaStatusResponse,
)
from dlog.net.server import Deferred, Later
from dlog.storage import LogConfig, LogManager, UnexpectedAppendOffsetError

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]

#: A local action of a metadata change that failed (say a disk error deleting a log)
#: is tried again after this, doubling up to the maximum while it keeps failing.
_METADATA_RETRY_S = 0.5
_METADATA_RETRY_MAX_S = 30.0
#: Partitions whose failure to apply is logged one by one in a round; the rest are
#: summed up in one more line.
_FAILURES_LOGGED = 3
#: A partition's disk errors (a full disk, say) are logged at most this often; a
#: producer retrying against a full disk would otherwise log one per attempt.
_STORAGE_ERROR_LOG_S = 30.0


#: An acks=all wait: (index in the results, partition, last offset, leader epoch).
_Wait = tuple[int, Partition, int, int]


class _Parked(ABC):
    """A request answered later without a task (an inline handler's :class:`Later`):
    parked on each partition it waits for, which pokes it at every change, and in the
    manager's deadline heap, which expires it. Kafka's purgatory."""

    __slots__ = ("finished", "later", "manager", "partitions")

    def __init__(self, manager: ReplicaManager) -> None:
        self.manager = manager
        self.later = Later()
        self.later.on_abandon = self.abandon
        self.partitions: list[Partition] = []
        self.finished = False

    @abstractmethod
    def poke(self) -> None:
        """A partition it waits for changed: answer if it can now."""

    @abstractmethod
    def expire(self) -> None:
        """Its deadline came: answer with what there is."""

    def abandon(self) -> None:
        """Its connection went away: let go of it now, not at the next change."""
        if not self.finished:
            self.finish(None)

    def finish(self, response: Message | None) -> None:
        self.finished = True
        for p in self.partitions:
            p.unpark(self)
        self.partitions = []
        self.manager._parked_finished += 1  # its heap entry is dead weight from now
        if response is not None:
            self.later.reply(response)


class _ParkedFetch(_Parked):
    """A fetch waiting for data (see :meth:`ReplicaManager.fetch`)."""

    __slots__ = ("follower", "request")

    def __init__(self, manager: ReplicaManager, request: FetchRequest, follower: bool) -> None:
        super().__init__(manager)
        self.request = request
        self.follower = follower

    def poke(self) -> None:
        """A fetched partition changed: answer if there is enough now."""
        if self.finished:
            return
        response = self.manager._answer_parked(self, at_deadline=False)
        if response is not None:
            self.finish(response)

    def expire(self) -> None:
        self.finish(self.manager._answer_parked(self, at_deadline=True))


class _ParkedProduce(_Parked):
    """An acks=all produce waiting for the HW to pass its batches (see
    :meth:`ReplicaManager.produce`; Kafka's DelayedProduce)."""

    __slots__ = ("request", "results", "waits")

    def __init__(
        self,
        manager: ReplicaManager,
        request: ProduceRequest,
        results: list[ProducePartitionResult],
        waits: list[_Wait],
    ) -> None:
        super().__init__(manager)
        self.request = request
        self.results = results
        self.waits = waits

    def poke(self) -> None:
        """A written partition changed (new HW, new role): settle what can be settled
        now, and answer once nothing waits."""
        if self.finished:
            return
        self.waits = _settle(self.request, self.results, self.waits)
        if not self.waits:
            self.expire()

    def expire(self) -> None:
        # Runs inside whatever changed the partition (a follower's fetch, a role
        # change), so nothing may escape into that: a failure is this request's error.
        try:
            response = _produce_outcome(self.request, self.results, self.waits)
        except Exception as exc:
            log.exception("answering a parked produce failed")
            error = UnknownServerError(f"{type(exc).__name__}: {exc}")
            response = ProduceResponse(
                partitions=[_produce_error(r.topic, r.partition, error) for r in self.results]
            )
        self.finish(response)


def _settle(
    request: ProduceRequest, results: list[ProducePartitionResult], waits: list[_Wait]
) -> list[_Wait]:
    """Settle each acks=all wait that can be now, writing its outcome into ``results``
    once and for all (as Kafka's DelayedProduce does per partition): replicated (the
    HW passed its batch while this replica led at its epoch; NOT_ENOUGH_REPLICAS_
    AFTER_APPEND if the ISR is below min_insync_replicas then), or NOT_LEADER_OR_
    FOLLOWER if the leadership moved first. Returns the waits still open."""
    still: list[_Wait] = []
    for wait in waits:
        i, p, last, epoch = wait
        r = results[i]
        err: DlogError | None = None
        if p.role is not Role.LEADER or p.leader_epoch != epoch:
            err = NotLeaderError(
                "leadership moved before the batch was replicated",
                leader=p.info.leader,
                leader_epoch=p.info.leader_epoch,
            )
        elif p.high_watermark <= last:
            still.append(wait)
            continue
        elif len(p.isr) < p.config.min_insync_replicas:
            err = NotEnoughReplicasAfterAppendError(
                f"{r.topic}-{r.partition}: ISR shrank to {list(p.isr)} below "
                f"min_insync_replicas={p.config.min_insync_replicas}"
            )
        if err is not None:
            results[i] = _produce_error(r.topic, r.partition, err)
    return still


def _produce_outcome(
    request: ProduceRequest, results: list[ProducePartitionResult], waits: list[_Wait]
) -> ProduceResponse:
    """The answer to an acks=all produce once it stops waiting: what :func:`_settle`
    settles now, and REQUEST_TIMED_OUT for the waits still open."""
    for i, _, _, _ in _settle(request, results, waits):
        r = results[i]
        error = RequestTimedOutError(
            f"{r.topic}-{r.partition}: not replicated to the ISR within {request.timeout_ms} ms"
        )
        results[i] = _produce_error(r.topic, r.partition, error)
    return ProduceResponse(partitions=results)


@dataclass(frozen=True, slots=True)
class ReplicaManagerHooks:
    """What the data plane needs from the rest of the broker (all cheap, no I/O)."""

    #: The current metadata image (read-only for the data plane).
    image: Callable[[], MetadataImage]
    #: The controller's RPC address, if one is known.
    controller_address: Callable[[], str | None]
    #: False once this broker has heard from no Raft leader for the session timeout:
    #: it must then stop acting as a partition leader.
    session_ok: Callable[[], bool]


class ReplicaManager:
    def __init__(
        self,
        config: BrokerConfig,
        logs: LogManager,
        pool: RpcPool,
        hooks: ReplicaManagerHooks,
        clock: WallClock,
    ) -> None:
        self.config = config
        self.node_id = config.node_id
        self.logs = logs
        self.pool = pool
        self.hooks = hooks
        self.clock = clock
        self.partitions: dict[TopicPartition, Partition] = {}
        self._fetchers: dict[TopicPartition, trio.CancelScope] = {}
        self._alter_in_flight: set[TopicPartition] = set()
        self._pending = MetadataDelta()
        self._pending_event = trio.Event()
        #: start_serving asked for stray logs to go before the next delta is applied.
        self._remove_strays = False
        self._nursery: trio.Nursery | None = None
        # Parked requests by deadline (see fetch, produce), and when _expire_parked
        # wakes next.
        self._parked: list[tuple[float, int, _Parked]] = []
        self._parked_seq = itertools.count()
        #: Entries of _parked already answered (removed lazily, or purged in bulk).
        self._parked_finished = 0
        #: Per partition with disk errors: (when the next may be logged, not logged since).
        self._storage_errors: dict[TopicPartition, tuple[float, int]] = {}
        self._parked_timer = math.inf
        self._parked_wake = trio.Event()
        # Test hook (see fetch_delay_s): a slow or stalled follower.
        self._fetch_delay_s = 0.0
        self._fetch_delay_changed = trio.Event()

    @property
    def fetch_delay_s(self) -> float:
        """Test hook: every follower fetch of this broker waits this long first.

        Changing it takes effect at once, also for fetches already waiting.
        """
        return self._fetch_delay_s

    @fetch_delay_s.setter
    def fetch_delay_s(self, seconds: float) -> None:
        self._fetch_delay_s = seconds
        self._fetch_delay_changed.set()
        self._fetch_delay_changed = trio.Event()

    async def _fetch_delay(self) -> None:
        start = trio.current_time()
        while self._fetch_delay_s > 0:
            remaining = start + self._fetch_delay_s - trio.current_time()
            if remaining <= 0:
                return
            with trio.move_on_after(remaining):
                await self._fetch_delay_changed.wait()

    # --- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled: applies metadata, runs fetchers and ISR checks."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._metadata_loop)
                nursery.start_soon(self._isr_shrink_loop)
                nursery.start_soon(self._expire_parked)
                task_status.started()
        finally:
            # Cleared on cancellation too: Raft may still apply metadata while the node
            # shuts down, and must find no (closed) nursery to start tasks in.
            self._nursery = None

    def on_metadata(self, delta: MetadataDelta) -> None:
        """Queue an applied metadata delta (called from the metadata apply path)."""
        self._pending.merge(delta)
        self._pending_event.set()

    def start_serving(self, image: MetadataImage) -> None:
        """This broker's metadata is current from now on (the controller unfenced it):
        delete the logs it no longer holds (topics deleted or re-created while it was
        away), then act on the whole ``image`` -- in that order, in the metadata task,
        so that no log it opens meanwhile can be taken for a stray."""
        self._remove_strays = True
        everything = image.everything()
        everything.brokers.clear()  # (no fetcher to restart: none runs yet)
        self.on_metadata(everything)

    async def _metadata_loop(self) -> None:
        retry_s = 0.0
        failed = MetadataDelta()
        while True:
            if failed.empty:
                await self._pending_event.wait()
            else:
                # What failed is tried again (with the current image) after a backoff,
                # or with the next metadata change, whichever comes first.
                with trio.move_on_after(retry_s):
                    await self._pending_event.wait()
            self._pending_event = trio.Event()
            delta, self._pending = self._pending, MetadataDelta()
            delta.merge(failed)
            try:
                if self._remove_strays:
                    await self.remove_stray_logs()
                    self._remove_strays = False
            except DlogError as exc:
                # Strays go before the image is applied (see start_serving): all of it
                # waits for the next attempt.
                failed = delta
                self._apply_failed("removing stray logs", exc)
            else:
                failed = await self._apply(delta)
            if failed.empty:
                retry_s = 0.0
            elif not self.logs.running:
                failed = MetadataDelta()  # the node is stopping: nothing to retry for
            else:
                retry_s = min(max(2 * retry_s, _METADATA_RETRY_S), _METADATA_RETRY_MAX_S)

    def _storage_failed(self, what: str, topic: str, partition: int, exc: StorageError) -> None:
        """Log a disk error of a partition: the first at once, then at most one per
        :data:`_STORAGE_ERROR_LOG_S` saying how many there were in between."""
        now = trio.current_time()
        key = (topic, partition)
        next_at, unlogged = self._storage_errors.get(key, (-math.inf, 0))
        if now < next_at:
            self._storage_errors[key] = (next_at, unlogged + 1)
            return
        self._storage_errors[key] = (now + _STORAGE_ERROR_LOG_S, 0)
        since = f" ({unlogged} more since the last report)" if unlogged else ""
        log.error("%s %s-%d failed: %s%s", what, topic, partition, exc, since)

    def _apply_failed(self, what: str, exc: DlogError) -> None:
        if not self.logs.running:
            # The node is stopping (its log manager first): nothing went wrong.
            log.info("metadata not applied, the node is stopping: %s: %s", what, exc)
        else:
            log.error("applying metadata to local replicas failed (will retry): %s: %s", what, exc)

    async def _apply(self, delta: MetadataDelta) -> MetadataDelta:
        """Act on ``delta`` as the current image has it. Each action stands alone: one
        that fails (logged) does not hold up the others and is returned, to be tried
        again; they are idempotent, so a retry does only what is still undone."""
        image = self.hooks.image()
        failed = MetadataDelta()
        for entry in delta.deleted_topics:
            name, topic_id, count = entry
            try:
                for partition in range(count):
                    await self._remove_partition((name, partition), topic_id)
            except DlogError as exc:
                failed.deleted_topics.append(entry)
                self._apply_failed(f"deleting topic {name}", exc)
        for name in delta.config_changed_topics:
            topic = image.topics.get(name)
            if topic is None:
                continue
            try:
                for info in topic.partitions:
                    p = self.partitions.get((name, info.partition))
                    if p is not None:
                        cfg = self._topic_config(image, info)
                        p.update_config(cfg)
                        p.log.update_config(self._log_config(cfg))
            except DlogError as exc:
                failed.config_changed_topics.add(name)
                self._apply_failed(f"configuring topic {name}", exc)
        unapplied: list[tuple[TopicPartition, DlogError]] = []
        for tp in sorted(delta.partitions):
            changed = image.partition(*tp)
            if changed is None:
                continue
            try:
                if self.node_id in changed.replicas:
                    await self._apply_partition(image, changed)
                elif tp in self.partitions:
                    await self._remove_partition(tp, changed.topic_id)
            except DlogError as exc:
                failed.partitions.add(tp)
                unapplied.append((tp, exc))
        # A disk or file-handle problem fails every partition alike: a few lines say
        # what, not one per partition on every retry.
        for (name, partition), error in unapplied[:_FAILURES_LOGGED]:
            self._apply_failed(f"partition {name}-{partition}", error)
        if len(unapplied) > _FAILURES_LOGGED:
            (name, partition), error = unapplied[-1]
            more = len(unapplied) - _FAILURES_LOGGED
            self._apply_failed(f"{more} more partitions, the last {name}-{partition}", error)
        if delta.brokers:
            # A broker's address may have changed: restart fetchers that follow it.
            for p in list(self.partitions.values()):
                if p.role is Role.FOLLOWER and p.info.leader in delta.brokers:
                    self._start_fetcher(p, p.info)
        return failed

    async def _apply_partition(self, image: MetadataImage, info: PartitionInfo) -> None:
        tp = (info.topic, info.partition)
        p = self.partitions.get(tp)
        if p is None:
            cfg = self._topic_config(image, info)
            plog = await self.logs.get_or_create(
                info.topic, info.partition, info.topic_id, self._log_config(cfg)
            )
            p = Partition(node_id=self.node_id, info=info, log=plog, config=cfg)
            self.partitions[tp] = p
        if info.leader == self.node_id:
            if p.role is not Role.LEADER or p.leader_epoch != info.leader_epoch:
                self._stop_fetcher(tp)
                p.become_leader(info, trio.current_time())
                log.info("leading %s-%d at epoch %d", info.topic, info.partition, info.leader_epoch)
            else:
                p.update_info(info)
        else:
            changed = p.role is Role.LEADER or p.leader_epoch != info.leader_epoch
            if changed or (info.leader is not None and tp not in self._fetchers):
                p.become_follower(info)
                if info.leader is None:
                    self._stop_fetcher(tp)
                else:
                    self._start_fetcher(p, info)
                    log.info(
                        "following %s-%d, leader %s at epoch %d",
                        info.topic,
                        info.partition,
                        info.leader,
                        info.leader_epoch,
                    )
            else:
                p.info = info

    async def _remove_partition(self, tp: TopicPartition, topic_id: str) -> None:
        self._stop_fetcher(tp)
        self._storage_errors.pop(tp, None)
        p = self.partitions.pop(tp, None)
        if p is not None:
            p.role = Role.NONE
            p.notify()
        if self.logs.topic_id(*tp) == topic_id or p is not None:
            await self.logs.delete(*tp)
            log.info("deleted replica %s-%d", *tp)

    def _topic_config(self, image: MetadataImage, info: PartitionInfo) -> TopicConfig:
        topic = image.topics.get(info.topic)
        overrides = topic.configs if topic is not None else {}
        return TopicConfig.resolve(overrides, len(info.replicas), self.config.topic_defaults)

    @staticmethod
    def _log_config(cfg: TopicConfig) -> LogConfig:
        return LogConfig.from_overrides(cfg.log_overrides())

    async def remove_stray_logs(self) -> None:
        """Delete logs of partitions the metadata no longer gives this broker.

        Only once this broker's metadata is caught up (a topic deleted while it was
        down must not come back), from the metadata task (see :meth:`start_serving`).
        """
        image = self.hooks.image()
        for (topic, partition), _ in list(self.logs.logs.items()):
            info = image.partition(topic, partition)
            if info is None or self.node_id not in info.replicas:
                if (topic, partition) not in self.partitions or info is None:
                    self.partitions.pop((topic, partition), None)
                    await self.logs.delete(topic, partition)
                    log.info("removed stray log %s-%d", topic, partition)
            elif self.logs.topic_id(topic, partition) != info.topic_id:
                await self.logs.delete(topic, partition)

    # --- lookups -----------------------------------------------------------------------

    def _leader(self, topic: str, partition: int, current_epoch: int = NO_EPOCH) -> Partition:
        p = self.partitions.get((topic, partition))
        if p is None:
            info = self.hooks.image().partition(topic, partition)
            if info is None:
                raise UnknownTopicOrPartitionError(f"{topic}-{partition} does not exist")
            raise NotLeaderError(
                f"broker {self.node_id} does not lead {topic}-{partition}",
                leader=info.leader,
                leader_epoch=info.leader_epoch,
            )
        if current_epoch != NO_EPOCH:
            if current_epoch < p.leader_epoch:
                raise FencedLeaderEpochError(
                    f"epoch {current_epoch} < {p.leader_epoch} for {topic}-{partition}",
                    leader=p.info.leader,
                    leader_epoch=p.leader_epoch,
                )
            if current_epoch > p.leader_epoch:
                raise UnknownLeaderEpochError(
                    f"epoch {current_epoch} > {p.leader_epoch} for {topic}-{partition}"
                )
        if p.role is not Role.LEADER:
            if p.info.leader is None:
                raise LeaderNotAvailableError(f"{topic}-{partition} has no leader")
            raise NotLeaderError(
                f"broker {self.node_id} does not lead {topic}-{partition}",
                leader=p.info.leader,
                leader_epoch=p.info.leader_epoch,
            )
        return p

    def _is_follower(self, p: Partition, replica_id: int) -> bool:
        return replica_id != self.node_id and replica_id in p.info.replicas

    def _not_a_follower(self, p: Partition, replica_id: int, current_epoch: int) -> NoReturn:
        """A follower fetch from a broker that does not replicate ``p`` (Kafka's answer:
        UNKNOWN_LEADER_EPOCH when it named our epoch, so it refreshes its metadata, else
        NOT_LEADER_OR_FOLLOWER)."""
        message = (
            f"broker {replica_id} is not a follower of {p.topic}-{p.partition} "
            f"(replicas {list(p.info.replicas)}, leader epoch {p.leader_epoch})"
        )
        if current_epoch != NO_EPOCH:
            raise UnknownLeaderEpochError(message)
        raise NotLeaderError(message, leader=self.node_id, leader_epoch=p.leader_epoch)

    # --- produce -------------------------------------------------------------------------

    def produce(self, request: ProduceRequest) -> ProduceResponse | Deferred | Later:
        """Append every partition's batches at once, in request order (an inline route).
        An acks=all request whose batches are not yet replicated is parked (a
        :class:`Later`, answered by the change that moves the HW past them or at its
        timeout, with no task); one that must fsync first is a :class:`Deferred`."""
        acks = request.acks
        if acks not in (ACKS_NONE, ACKS_LEADER, ACKS_ALL):
            raise InvalidRequiredAcksError(f"acks={acks}")
        payload = memoryview(payload_bytes(request.payload))
        # The sizes cut the payload into the partitions' record sets, in order: unless
        # they add up to it exactly, no cut is trustworthy and nothing is written.
        framed = 0
        for part in request.partitions:
            if part.size < 0:
                raise InvalidRequestError(
                    f"{part.topic}-{part.partition}: negative size {part.size}; partition "
                    "sizes frame the payload"
                )
            framed += part.size
        if framed != len(payload):
            raise InvalidRequestError(
                f"partition sizes add up to {framed} bytes; the payload has {len(payload)}"
            )
        results: list[ProducePartitionResult] = []
        waits: list[_Wait] = []
        appended: list[Partition] = []
        position = 0
        session_ok = self.hooks.session_ok()
        topics = self.hooks.image().topics
        for part in request.partitions:
            chunk = payload[position : position + part.size]
            position += part.size
            try:
                if not part.size:
                    raise InvalidRequestError(f"{part.topic}-{part.partition}: no record batches")
                topic = topics.get(part.topic)
                if topic is not None and topic.internal:
                    # Its records are the broker's own (e.g. the offsets coordinator's,
                    # which replays them as commits): as in Kafka, clients may not write.
                    raise InvalidTopicError(f"{part.topic} is internal; clients cannot write to it")
                p = self._leader(part.topic, part.partition)
                if not session_ok:
                    raise NotLeaderError(
                        f"broker {self.node_id} lost its Raft session; not leading",
                        leader=None,
                    )
                min_isr = p.config.min_insync_replicas
                if acks == ACKS_ALL and len(p.isr) < min_isr:
                    raise NotEnoughReplicasError(
                        f"{part.topic}-{part.partition}: ISR {list(p.isr)} smaller than "
                        f"min_insync_replicas={min_isr}"
                    )
                info = p.append_as_leader(bytearray(chunk))
            except DlogError as exc:
                # (A disk failure, not "closed" or "being truncated": a partition going
                # away.)
                if isinstance(exc, StorageIOError):
                    self._storage_failed("appending to", part.topic, part.partition, exc)
                results.append(_produce_error(part.topic, part.partition, exc))
                continue
            except Exception as exc:
                # A bug, or an OSError the storage did not expect: this partition's
                # error alone (as Kafka does), not the whole request's -- the others
                # may have been appended already, and a client retrying all of them
                # would write those twice.
                log.exception("appending to %s-%d failed", part.topic, part.partition)
                error = UnknownServerError(f"{type(exc).__name__}: {exc}")
                results.append(_produce_error(part.topic, part.partition, error))
                continue
            results.append(
                ProducePartitionResult(
                    topic=part.topic,
                    partition=part.partition,
                    base_offset=info.first_offset,
                    last_offset=info.last_offset,
                    log_start_offset=p.log.log_start_offset,
                )
            )
            if acks == ACKS_ALL:
                waits.append((len(results) - 1, p, info.last_offset, p.leader_epoch))
            appended.append(p)
        # Everything above ran without an await: appends happen in request order.
        flushes = [p for p in appended if p.log.flush_before_ack]
        if not waits and not flushes:
            return ProduceResponse(partitions=results)
        if flushes or self._nursery is None:
            # fsync first (in a thread), or shutting down (nothing would expire a
            # parked request): a task of the server's waits.
            return Deferred(lambda: self._complete_produce(request, results, waits, flushes))
        waits = _settle(request, results, waits)
        if not waits:  # e.g. the leader alone in its ISR
            return ProduceResponse(partitions=results)
        # Park it: the follower fetch that moves the last HW past its batches answers
        # it, from that fetch's handler; the deadline heap times it out.
        parked = _ParkedProduce(self, request, results, waits)
        for _, p, _, _ in waits:
            if p not in parked.partitions:
                parked.partitions.append(p)
                p.park(parked)
        self._park_until(trio.current_time() + _timeout_s(request), parked)
        return parked.later

    async def _complete_produce(
        self,
        request: ProduceRequest,
        results: list[ProducePartitionResult],
        waits: list[_Wait],
        flushes: list[Partition],
    ) -> ProduceResponse:
        """A produce that must fsync before it answers (flush_messages=1): fsync,
        then wait for replication as a parked produce would. A partition whose fsync
        fails gets that error alone; the others were written and keep their results."""
        for p in flushes:
            try:
                await p.log.flush()
            except Exception as exc:
                if isinstance(exc, StorageIOError):
                    self._storage_failed("flushing", p.topic, p.partition, exc)
                elif not isinstance(exc, DlogError):
                    log.exception("flushing %s-%d failed", p.topic, p.partition)
                error = (
                    exc
                    if isinstance(exc, DlogError)
                    else UnknownServerError(f"{type(exc).__name__}: {exc}")
                )
                for i, r in enumerate(results):
                    if (r.topic, r.partition) == (p.topic, p.partition) and not r.error_code:
                        results[i] = _produce_error(p.topic, p.partition, error)
                waits = [w for w in waits if w[1] is not p]
        with trio.move_on_after(_timeout_s(request)):
            while waits := _settle(request, results, waits):
                _, p, last, _ = waits[0]
                await p.wait_for_high_watermark(last)  # (until that one settles)
        return _produce_outcome(request, results, waits)

    # --- fetch ----------------------------------------------------------------------------

    def fetch(self, request: FetchRequest) -> FetchResponse | Later:
        """Answer at once when there is enough to send (``min_bytes``), an error, or no
        wait asked for; else park the request (an inline route returning a
        :class:`Later`): every change of a fetched partition pokes it, and it is
        answered from there once it has enough, or by :meth:`_expire_parked` at its
        deadline. No task, cancel scope or event per long poll."""
        follower = request.replica_id >= 0
        now = trio.current_time()
        if follower:
            for fp in request.partitions:
                p = self.partitions.get((fp.topic, fp.partition))
                # Only what _read serves counts (as in Kafka, the follower's position
                # is recorded after a successful read): its fetch offset becomes its
                # log end offset, which moves the HW.
                if (
                    p is not None
                    and p.role is Role.LEADER
                    and fp.current_leader_epoch in (NO_EPOCH, p.leader_epoch)
                    and self._is_follower(p, request.replica_id)
                    and p.log.log_start_offset <= fp.fetch_offset <= p.log_end_offset
                ):
                    p.record_follower_fetch(request.replica_id, fp.fetch_offset, now)
                    if request.replica_id not in p.info.isr:
                        # A fetch can only bring its follower into the ISR; dropping
                        # laggards is _isr_shrink_loop's job (as in Kafka).
                        self._maybe_alter_isr(p)
        results, chunks, total, errors = self._read(request, follower)
        deadline = now + max(0, request.max_wait_ms) / 1000
        if (
            total >= request.min_bytes
            or errors
            or now >= deadline
            or not request.partitions
            or self._nursery is None  # shutting down: nothing would expire it
        ):
            return FetchResponse(partitions=results, payload=chunks)
        parked = _ParkedFetch(self, request, follower)
        for fp in request.partitions:
            p = self.partitions.get((fp.topic, fp.partition))
            if p is not None:
                parked.partitions.append(p)
                p.park(parked)
        self._park_until(deadline, parked)
        return parked.later

    def _park_until(self, deadline: float, parked: _Parked) -> None:
        """Put ``parked`` in the deadline heap (:meth:`_expire_parked` serves it)."""
        heap = self._parked
        if self._parked_finished > 64 and self._parked_finished * 2 > len(heap):
            # Most entries were answered before their deadlines: drop them, so the heap
            # holds about what is still parked rather than rate x max_wait_ms entries.
            heap[:] = [entry for entry in heap if not entry[2].finished]
            heapq.heapify(heap)
            self._parked_finished = 0
        heapq.heappush(heap, (deadline, next(self._parked_seq), parked))
        if deadline < self._parked_timer:
            self._parked_wake.set()

    def _answer_parked(self, parked: _ParkedFetch, *, at_deadline: bool) -> FetchResponse | None:
        """The answer for ``parked`` if it has enough now (or whatever there is, at its
        deadline); None to keep waiting. Runs inside whatever changed the partition
        (an append, a new HW, a role change), so nothing it does may escape into that:
        an unexpected failure is this request's error, as it would be in a handler."""
        request = parked.request
        try:
            results, chunks, total, errors = self._read(request, parked.follower)
        except Exception as exc:
            log.exception("answering a parked fetch failed")
            error = UnknownServerError(f"{type(exc).__name__}: {exc}")
            return FetchResponse(partitions=[_fetch_error(fp, error) for fp in request.partitions])
        if at_deadline or total >= request.min_bytes or errors:
            return FetchResponse(partitions=results, payload=chunks)
        return None

    async def _expire_parked(self) -> None:
        """Answers parked requests at their deadlines: one task and one timer for all."""
        heap = self._parked
        try:
            while True:
                now = trio.current_time()
                while heap and (heap[0][2].finished or heap[0][0] <= now):
                    parked = heapq.heappop(heap)[2]
                    if not parked.finished:
                        parked.expire()
                    self._parked_finished -= 1  # (finishing it counted it)
                self._parked_timer = heap[0][0] if heap else math.inf
                self._parked_wake = trio.Event()
                with trio.move_on_at(self._parked_timer):
                    await self._parked_wake.wait()
        finally:
            # Stopping (the node shuts down): nothing would answer the parked ones.
            parked_now = list(heap)
            heap.clear()
            for _, _, parked in parked_now:
                if not parked.finished:
                    parked.expire()
            self._parked_finished = 0
            self._parked_timer = math.inf

    def _read(
        self, request: FetchRequest, follower: bool
    ) -> tuple[list[FetchPartitionResult], list[bytes], int, bool]:
        results: list[FetchPartitionResult] = []
        chunks: list[bytes] = []
        total = 0
        errors = False
        # (A request may ask for more than the broker sends in one answer.)
        max_bytes = min(request.max_bytes, self.config.fetch_max_bytes)
        for fp in request.partitions:
            try:
                p = self._leader(fp.topic, fp.partition, fp.current_leader_epoch)
                if follower and not self._is_follower(p, request.replica_id):
                    self._not_a_follower(p, request.replica_id, fp.current_leader_epoch)
                budget = min(fp.partition_max_bytes, max_bytes - total)
                plog = p.log
                upper = None if follower else p.high_watermark
                if budget <= 0:
                    data_chunks: tuple[bytes, ...] = ()
                    # Still check the offset is valid.
                    if not plog.log_start_offset <= fp.fetch_offset <= plog.log_end_offset:
                        plog.read(fp.fetch_offset, 0, upper, min_one_batch=False)
                else:
                    data = plog.read(fp.fetch_offset, budget, upper)
                    data_chunks = data.chunks
                size = sum(len(c) for c in data_chunks)
                chunks.extend(data_chunks)
                total += size
                results.append(
                    FetchPartitionResult(
                        topic=fp.topic,
                        partition=fp.partition,
                        high_watermark=p.high_watermark,
                        log_start_offset=plog.log_start_offset,
                        log_end_offset=plog.log_end_offset,
                        size=size,
                        leader=self.node_id,
                        leader_epoch=p.leader_epoch,
                    )
                )
            except DlogError as exc:
                errors = True
                results.append(_fetch_error(fp, exc))
        return results, chunks, total, errors

    # --- offsets -----------------------------------------------------------------------

    async def list_offsets(self, request: ListOffsetsRequest) -> ListOffsetsResponse:
        results = []
        for q in request.partitions:
            try:
                if q.timestamp < 0 and q.timestamp not in (EARLIEST_TIMESTAMP, LATEST_TIMESTAMP):
                    raise InvalidRequestError(
                        f"timestamp {q.timestamp}: use a time in ms (>= 0), "
                        f"{LATEST_TIMESTAMP} (latest) or {EARLIEST_TIMESTAMP} (earliest)"
                    )
                p = self._leader(q.topic, q.partition)
                hw = p.high_watermark
                offset: int
                ts: int
                if q.timestamp == EARLIEST_TIMESTAMP:
                    offset, ts = p.log.log_start_offset, -1
                elif q.timestamp == LATEST_TIMESTAMP:
                    offset, ts = hw, -1
                else:
                    found = p.log.offset_for_timestamp(q.timestamp)
                    if found is None or found.offset >= hw:
                        offset, ts = -1, -1
                    else:
                        offset, ts = found.offset, found.timestamp
                results.append(
                    ListOffsetsPartitionResult(
                        topic=q.topic,
                        partition=q.partition,
                        offset=offset,
                        timestamp=ts,
                        leader=self.node_id,
                        leader_epoch=p.leader_epoch,
                    )
                )
            except DlogError as exc:
                results.append(
                    ListOffsetsPartitionResult(
                        topic=q.topic,
                        partition=q.partition,
                        error_code=int(exc.code),
                        error_message=exc.message,
                        leader=exc.details.get("leader"),
                        leader_epoch=exc.details.get("leader_epoch", NO_EPOCH),
                    )
                )
        return ListOffsetsResponse(partitions=results)

    async def offsets_for_leader_epoch(
        self, request: OffsetsForLeaderEpochRequest
    ) -> OffsetsForLeaderEpochResponse:
        results = []
        for q in request.partitions:
            try:
                p = self._leader(q.topic, q.partition, q.current_leader_epoch)
                epoch, end = p.log.end_offset_for_epoch(q.leader_epoch)
                results.append(
                    EpochEndOffset(
                        topic=q.topic, partition=q.partition, leader_epoch=epoch, end_offset=end
                    )
                )
            except DlogError as exc:
                results.append(
                    EpochEndOffset(
                        topic=q.topic,
                        partition=q.partition,
                        error_code=int(exc.code),
                        error_message=exc.message,
                    )
                )
        return OffsetsForLeaderEpochResponse(partitions=results)

    async def replica_status(self, request: ReplicaStatusRequest) -> ReplicaStatusResponse:
        now = trio.current_time()
        out = []
        for (topic, partition), p in sorted(self.partitions.items()):
            if request.topics is not None and topic not in request.topics:
                continue
            replicas = []
            if p.role is Role.LEADER:
                replicas.append(ReplicaState(node_id=self.node_id, log_end_offset=p.log_end_offset))
                for node, state in sorted(p.followers.items()):
                    lag = 0.0 if state.last_caught_up == -math.inf else now - state.last_caught_up
                    replicas.append(
                        ReplicaState(
                            node_id=node,
                            log_end_offset=state.log_end_offset,
                            lag_s=round(max(0.0, lag), 3),
                        )
                    )
            out.append(
                PartitionState(
                    topic=topic,
                    partition=partition,
                    role=p.role.value,
                    leader_epoch=p.leader_epoch,
                    log_start_offset=p.log.log_start_offset,
                    log_end_offset=p.log_end_offset,
                    high_watermark=p.high_watermark,
                    size_bytes=p.log.size_in_bytes,
                    replicas=replicas,
                )
            )
        return ReplicaStatusResponse(node_id=self.node_id, partitions=out)

    # --- ISR changes (leader side) -----------------------------------------------------------

    def _usable_brokers(self) -> list[int]:
        return self.hooks.image().unfenced_brokers()

    def _maybe_alter_isr(self, p: Partition) -> None:
        tp = (p.topic, p.partition)
        if tp in self._alter_in_flight or self._nursery is None:
            return
        lag_s = self.config.replica_lag_time_max_ms / 1000
        wanted = p.isr_change_wanted(trio.current_time(), lag_s, self._usable_brokers())
        if wanted is None:
            return
        p.pending_isr = wanted
        # Additions count toward the HW at once (maximal ISR); removals only once committed.
        if p.maybe_advance_high_watermark():
            p.notify()
        self._alter_in_flight.add(tp)
        self._nursery.start_soon(self._alter_isr, p, wanted)

    async def _alter_isr(self, p: Partition, wanted: tuple[int, ...]) -> None:
        tp = (p.topic, p.partition)
        request = AlterPartitionRequest(
            broker_id=self.node_id,
            topic_id=p.topic_id,
            partition=p.partition,
            leader_epoch=p.leader_epoch,
            partition_epoch=p.info.partition_epoch,
            new_isr=list(wanted),
        )
        try:
            address = self.hooks.controller_address()
            if address is None:
                raise NetworkError("no controller known")
            response = await self.pool.call(address, request, timeout=5)
            assert isinstance(response, AlterPartitionResponse)
            log.info(
                "ISR of %s-%d is now %s (partition epoch %d)",
                p.topic,
                p.partition,
                response.isr,
                response.partition_epoch,
            )
            # Wait for the change to reach our metadata; then pending_isr clears.
            with trio.move_on_after(5):
                while (
                    p.pending_isr is not None and p.info.partition_epoch < response.partition_epoch
                ):
                    await p.wait_changed()
        except DlogError as exc:
            log.info("ISR change %s for %s-%d not made: %s", list(wanted), *tp, exc)
            with trio.move_on_after(self.config.replica_fetch_backoff_ms / 1000):
                await p.wait_changed()
        finally:
            p.pending_isr = None
            self._alter_in_flight.discard(tp)
            if p.maybe_advance_high_watermark():
                p.notify()

    async def _isr_shrink_loop(self) -> None:
        interval = min(1.0, self.config.replica_lag_time_max_ms / 2000)
        while True:
            await trio.sleep(interval)
            for p in list(self.partitions.values()):
                if p.role is Role.LEADER:
                    self._maybe_alter_isr(p)

    # --- follower side --------------------------------------------------------------------------

    def _stop_fetcher(self, tp: TopicPartition) -> None:
        scope = self._fetchers.pop(tp, None)
        if scope is not None:
            scope.cancel()

    def _start_fetcher(self, p: Partition, info: PartitionInfo) -> None:
        tp = (p.topic, p.partition)
        self._stop_fetcher(tp)
        if self._nursery is None or info.leader is None or info.leader == self.node_id:
            return
        scope = trio.CancelScope()
        self._fetchers[tp] = scope
        self._nursery.start_soon(self._follow, p, info, scope)

    async def _follow(self, p: Partition, info: PartitionInfo, scope: trio.CancelScope) -> None:
        """Replicate ``p`` from ``info.leader`` at ``info.leader_epoch`` until cancelled."""
        with scope:
            backoff = self.config.replica_fetch_backoff_ms / 1000
            leader = info.leader
            assert leader is not None
            truncated = False
            while True:
                broker = self.hooks.image().brokers.get(leader)
                if broker is None:
                    await trio.sleep(backoff)
                    continue
                address = broker.rpc
                try:
                    if not truncated:
                        await self._truncate_to_leader(p, address, info.leader_epoch)
                        truncated = True
                    truncated = await self._fetch_once(p, address, info.leader_epoch)
                except (NetworkError, RequestTimedOutError) as exc:
                    log.debug("fetch %s-%d from %d: %s", p.topic, p.partition, leader, exc)
                    await trio.sleep(backoff)
                except StorageError as exc:
                    # A disk error here (appending, truncating, fsyncing) or the
                    # leader's, reported once per interval rather than once per backoff.
                    self._storage_failed(f"following {leader} for", p.topic, p.partition, exc)
                    await trio.sleep(backoff)
                except DlogError as exc:
                    log.info("fetch %s-%d from %d: %s", p.topic, p.partition, leader, exc)
                    await trio.sleep(backoff)

    async def _truncate_to_leader(self, p: Partition, address: str, epoch: int) -> None:
        plog = p.log
        latest = plog.latest_epoch
        if latest is None:
            return
        if latest > epoch:
            # Our log has batches of a later leader epoch than the one we are told to
            # follow: this metadata is stale (a newer leader wrote them). Truncating to
            # what the older leader knows would throw away records a newer epoch may
            # have committed; wait for newer metadata instead (it restarts us).
            raise FencedLeaderEpochError(
                f"{p.topic}-{p.partition}: the log is at leader epoch {latest}, newer "
                f"than the epoch {epoch} to follow; waiting for newer metadata",
                leader_epoch=epoch,
                latest_epoch=latest,
            )
        request = OffsetsForLeaderEpochRequest(
            replica_id=self.node_id,
            partitions=[
                EpochQuery(
                    topic=p.topic,
                    partition=p.partition,
                    leader_epoch=latest,
                    current_leader_epoch=epoch,
                )
            ],
        )
        response = await self.pool.call(address, request, timeout=5)
        assert isinstance(response, OffsetsForLeaderEpochResponse)
        r = response.partitions[0]
        if r.error_code:
            raise _error(r.error_code, r.error_message)
        target: int
        if r.leader_epoch == NO_EPOCH or r.end_offset < 0:
            target = min(plog.high_watermark, plog.log_end_offset)
        elif r.leader_epoch == latest:
            target = min(r.end_offset, plog.log_end_offset)
        else:
            _, our_end = plog.end_offset_for_epoch(r.leader_epoch)
            target = min(r.end_offset, our_end)
        if target < plog.log_end_offset:
            log.info(
                "truncating %s-%d from %d to %d (leader epoch %d ends at %d)",
                p.topic,
                p.partition,
                plog.log_end_offset,
                target,
                r.leader_epoch,
                r.end_offset,
            )
            await plog.truncate_to(target)
            p.notify()

    async def _fetch_once(self, p: Partition, address: str, epoch: int) -> bool:
        """One long-poll fetch; returns False when the log must be re-truncated."""
        if self._fetch_delay_s:
            await self._fetch_delay()
        plog = p.log
        request = FetchRequest(
            replica_id=self.node_id,
            max_wait_ms=self.config.replica_fetch_max_wait_ms,
            min_bytes=1,
            max_bytes=self.config.replica_fetch_max_bytes,
            partitions=[
                FetchPartition(
                    topic=p.topic,
                    partition=p.partition,
                    fetch_offset=plog.log_end_offset,
                    partition_max_bytes=self.config.replica_fetch_max_bytes,
                    current_leader_epoch=epoch,
                )
            ],
        )
        timeout = self.config.replica_fetch_max_wait_ms / 1000 + 10
        response = await self.pool.call(address, request, timeout=timeout)
        assert isinstance(response, FetchResponse)
        r = response.partitions[0]
        if r.error_code == ErrorCode.OFFSET_OUT_OF_RANGE:
            if plog.log_end_offset < r.log_start_offset:
                log.info(
                    "%s-%d is behind the leader's log start %d: starting over there",
                    p.topic,
                    p.partition,
                    r.log_start_offset,
                )
                await plog.truncate_fully_and_start_at(r.log_start_offset)
                p.notify()
                return True
            return False
        if r.error_code:
            raise _error(r.error_code, r.error_message)
        batches = payload_bytes(response.payload)
        try:
            p.append_as_follower(batches, r.high_watermark)
        except UnexpectedAppendOffsetError as exc:
            log.warning("%s-%d: %s; re-truncating", p.topic, p.partition, exc)
            return False
        if batches and plog.flush_before_ack:
            await plog.flush()
        return True


def _timeout_s(request: ProduceRequest) -> float:
    """How long an acks=all produce waits for replication (as Kafka's DelayedProduce,
    a timeout <= 0 waits for nothing)."""
    return max(0, request.timeout_ms) / 1000


def _error(code: int, message: str) -> DlogError:
    return error_from_wire(code, message)


def _produce_error(topic: str, partition: int, exc: DlogError) -> ProducePartitionResult:
    return ProducePartitionResult(
        topic=topic,
        partition=partition,
        error_code=int(exc.code),
        error_message=exc.message,
        leader=exc.details.get("leader"),
        leader_epoch=exc.details.get("leader_epoch", NO_EPOCH),
    )


def _fetch_error(fp: FetchPartition, exc: DlogError) -> FetchPartitionResult:
    return FetchPartitionResult(
        topic=fp.topic,
        partition=fp.partition,
        error_code=int(exc.code),
        error_message=exc.message,
        log_start_offset=exc.details.get("log_start_offset", -1),
        log_end_offset=exc.details.get("log_end_offset", -1),
        leader=exc.details.get("leader"),
        leader_epoch=exc.details.get("leader_epoch", NO_EPOCH),
    )
